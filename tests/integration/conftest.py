"""Real brokers on loopback: the embedded amqtt broker and a real mosquitto."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.embedded import EmbeddedBroker, free_port
from iotoffload.transport.security import MqttSecurity
from tests.integration.secure import SecuredLab, SecureMosquitto, wait_listening


class Mosquitto:
    """A mosquitto of our own on a free loopback port; ``restart()`` keeps the port."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.skip("mosquitto is not installed (.ci/run installs it)")
        self.exe = exe
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        shipped = (Path(__file__).parents[2] / "configs" / "mosquitto.conf").read_text()
        # the project's shipped config, on a free port of our own
        self.conf.write_text(shipped.replace("listener 1883 ", f"listener {self.port} "))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stderr=subprocess.DEVNULL)
        wait_listening(self.proc, self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@dataclass(frozen=True)
class BrokerUnderTest:
    url: str
    protocol: int  # MQTT 5 or 3.1.1 (311) for every client of the test
    lab: SecuredLab | None = None  # the secured deployment: one identity per client

    def security(self, who: str) -> MqttSecurity | None:
        """``who``'s credentials on the secured deployment (None elsewhere: the agents take
        them, if any, from ``IOTOFFLOAD_MQTT_*``)."""
        return self.lab.security(who) if self.lab is not None else None


# the identities of the secured deployment (security init), for the tests that take ``broker``
LAB_IDS = {
    "edges": ("edge1", "edge2"),
    "devices": ("dev1", "dev2", "dev3", "spy"),
    "operators": ("ops",),
}


@pytest.fixture(
    params=[
        "embedded-v311",
        "mosquitto-v5",
        "mosquitto-v311",
        "mosquitto-tls-v5",
        "secured-v5",
        "secured-v311",
        "embedded-secured-v311",
    ]
)
def broker(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BrokerUnderTest]:
    """The broker every client of the test uses. ``mosquitto-tls``: TLS, no anonymous
    clients, a password per client; every link the test makes (agents, spies) gets the
    credentials from ``IOTOFFLOAD_MQTT_*``, as a deployed agent would from its config.
    ``secured``: the deployment `iotoffload security init` writes (client certificates, the
    ACL by role, the identity bound to the client id): each client connects as its own
    identity (``broker.security(who)``) and may do only what its role may."""
    kind, proto = request.param.split("-v")
    if kind == "embedded-secured":  # the same deployment on the embedded broker
        with SecuredLab(tmp_path / "lab", engine="embedded", **LAB_IDS) as lab:
            yield BrokerUnderTest(lab.url, int(proto), lab)
    elif kind == "embedded":  # amqtt speaks 3.1.1 only
        with EmbeddedBroker() as b:
            yield BrokerUnderTest(b.url, int(proto))
    elif kind == "secured":
        with SecuredLab(tmp_path / "lab", **LAB_IDS) as lab:
            yield BrokerUnderTest(lab.url, int(proto), lab)
    elif kind == "mosquitto-tls":
        secure = SecureMosquitto(tmp_path / "tls", client_certs=False)
        who = secure.add("tester")
        monkeypatch.setenv("IOTOFFLOAD_MQTT_CA_FILE", str(secure.ca_file))
        monkeypatch.setenv("IOTOFFLOAD_MQTT_USERNAME", who.name)
        monkeypatch.setenv("IOTOFFLOAD_MQTT_PASSWORD_FILE", str(who.password_file))
        with secure:
            yield BrokerUnderTest(secure.url, int(proto))
    else:
        with Mosquitto(tmp_path) as m:
            yield BrokerUnderTest(m.url, int(proto))
