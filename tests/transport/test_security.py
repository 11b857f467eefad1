"""Broker links against a real mosquitto with TLS, passwords and client certificates: every
right credential connects and carries messages; every wrong one is a one-line
``BrokerAuthError`` within a second, never a retry loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from iotoffload.transport.mqtt import (
    BrokerAuthError,
    BrokerURL,
    Message,
    MqttLink,
    MqttSecurity,
    SecurityConfigError,
)
from tests.integration.secure import SecureMosquitto, tls_handshake_ok


@pytest.fixture(scope="module")
def pw_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMosquitto]:
    b = SecureMosquitto(tmp_path_factory.mktemp("pw-broker"))
    b.add("alice")
    b.add("bob")
    with b:
        yield b


@pytest.fixture(scope="module")
def cert_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMosquitto]:
    b = SecureMosquitto(tmp_path_factory.mktemp("cert-broker"), client_certs=True)
    b.add("carol")
    b.expired("old")
    with b:
        yield b


def _round_trip(url: str, sec: MqttSecurity, protocol: int = 5) -> bytes:
    got: list[bytes] = []
    done = threading.Event()

    def on(m: Message) -> None:
        got.append(m.payload)
        done.set()

    link = MqttLink(url, f"t-{time.monotonic_ns()}", protocol=protocol, security=sec)
    link.subscribe("t/echo", on)
    link.connect(5)
    try:
        link.publish("t/echo", b"hello over TLS")
        assert done.wait(5), "no message through the secured broker"
    finally:
        link.close()
    return got[0]


def _refused(url: str, sec: MqttSecurity, protocol: int = 5) -> str:
    """The error of a connect that must fail, and that it failed fast."""
    link = MqttLink(url, f"t-{time.monotonic_ns()}", protocol=protocol, security=sec)
    t0 = time.monotonic()
    with pytest.raises(BrokerAuthError) as e:
        link.connect(10)
    assert time.monotonic() - t0 < 3, "a refusal must not wait for the connect timeout"
    msg = str(e.value)
    assert "\n" not in msg, msg  # one line
    assert "0123456789" not in msg  # never the password (the fixture's all end so)
    return msg


def test_fixture_serves_tls(pw_broker: SecureMosquitto) -> None:
    assert tls_handshake_ok(pw_broker.port, pw_broker.ca_file)


@pytest.mark.parametrize("protocol", [5, 311])
def test_password_over_tls_works(pw_broker: SecureMosquitto, protocol: int) -> None:
    sec = pw_broker.identities["alice"].security(pw_broker.ca_file)
    assert _round_trip(pw_broker.url, sec, protocol) == b"hello over TLS"


@pytest.mark.parametrize("protocol", [5, 311])
def test_wrong_password_is_a_clear_error(
    pw_broker: SecureMosquitto, tmp_path: Path, protocol: int
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    sec = MqttSecurity(ca_file=pw_broker.ca_file, username="alice", password_file=wrong)
    msg = _refused(pw_broker.url, sec, protocol)
    assert "refused" in msg and "user alice" in msg


def test_anonymous_client_is_refused(pw_broker: SecureMosquitto) -> None:
    msg = _refused(pw_broker.url, MqttSecurity(ca_file=pw_broker.ca_file))
    assert "no credentials" in msg


def test_a_broker_from_another_ca_fails_verification(pw_broker: SecureMosquitto) -> None:
    """A spoofed broker (its certificate from a CA we do not trust) is never talked to."""
    other = pw_broker.dir / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    sec = MqttSecurity(
        ca_file=other, username="alice", password_file=pw_broker.identities["alice"].password_file
    )
    msg = _refused(pw_broker.url, sec)
    assert "fails verification" in msg and str(other) in msg


def test_hostname_is_verified(tmp_path: Path) -> None:
    """A broker whose certificate names only ``localhost``, reached as 127.0.0.1: refused,
    unless the lab explicitly turns the check off."""
    b = SecureMosquitto(tmp_path, names=("localhost",))
    alice = b.add("alice")  # before it starts: mosquitto reads its password file then
    with b:
        msg = _refused(b.url, alice.security(b.ca_file))
        assert "fails verification" in msg and "127.0.0.1" in msg
        insecure = MqttSecurity(
            ca_file=b.ca_file,
            username="alice",
            password_file=alice.password_file,
            tls_insecure=True,
        )
        assert _round_trip(b.url, insecure) == b"hello over TLS"


def test_client_certificate_is_the_identity(cert_broker: SecureMosquitto) -> None:
    carol = cert_broker.identities["carol"]
    sec = carol.security(cert_broker.ca_file, cert=True, password=False)
    assert _round_trip(cert_broker.url, sec) == b"hello over TLS"


def test_missing_or_expired_client_certificate_is_refused(cert_broker: SecureMosquitto) -> None:
    msg = _refused(cert_broker.url, MqttSecurity(ca_file=cert_broker.ca_file))
    assert "certificate" in msg
    old = cert_broker.identities["old"]
    msg = _refused(cert_broker.url, old.security(cert_broker.ca_file, cert=True, password=False))
    assert "certificate" in msg


def test_setup_errors_are_caught_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="use mqtts://"):
        MqttLink("mqtt://127.0.0.1:1", "c", security=MqttSecurity(ca_file=tmp_path / "ca.pem"))
    with pytest.raises(SecurityConfigError, match="does not exist or cannot be read"):
        MqttLink("mqtts://127.0.0.1:1", "c", security=MqttSecurity(ca_file=tmp_path / "nope.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(SecurityConfigError, match="no usable certificate"):
        MqttLink("mqtts://127.0.0.1:1", "c", security=MqttSecurity(ca_file=bad))
    with pytest.raises(SecurityConfigError, match="cannot read the password file"):
        MqttLink(
            "mqtts://127.0.0.1:1",
            "c",
            security=MqttSecurity(username="u", password_file=tmp_path / "missing"),
        )
    with pytest.raises(ValueError, match="needs cert_file"):
        MqttSecurity(key_file=tmp_path / "k")
    with pytest.raises(ValueError, match="needs a username"):
        MqttSecurity(password_file=tmp_path / "p")


def test_password_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTOFFLOAD_MQTT_PASSWORD", "s3cret-value")
    monkeypatch.setenv("IOTOFFLOAD_MQTT_USERNAME", "dave")
    sec = MqttSecurity()
    assert sec.read_password() == "s3cret-value"
    for text in (repr(sec), str(sec), sec.describe(), sec.model_dump_json()):
        assert "s3cret-value" not in text


def test_urls() -> None:
    assert BrokerURL.parse("mqtts://broker.lan") == BrokerURL("broker.lan", 8883, True)
    assert str(BrokerURL.parse("mqtts://10.0.0.1:9999")) == "mqtts://10.0.0.1:9999"
    assert BrokerURL.parse("mqtt://h") == BrokerURL("h", 1883, False)
    with pytest.raises(ValueError, match="expected mqtt"):
        BrokerURL.parse("http://h")
