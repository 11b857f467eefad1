"""The embedded broker secured with what `iotoffload security init --auth password` wrote:
passwords from mosquitto's own file, and amqtt's own holes closed (a refused CONNECT that
would drop or take over someone's session, a Last Will on a topic the client may not write,
the sessions refused clients leave behind). The attack suite of test_secured_broker runs on
this broker too, with client certificates."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from broker.embedded import free_port
from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.security import BrokerAuthError, MqttSecurity
from iotoffload.transport.status import EdgeStatus
from iotoffload.transport.topics import Topics
from tests.integration.secure import SecuredLab

pytestmark = pytest.mark.integration
T = Topics()
IOTOFFLOAD = str(Path(sys.executable).with_name("iotoffload"))
IDS = {"edges": ("e1",), "devices": ("d1", "mallory"), "operators": ("ops",)}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SecuredLab]:
    with SecuredLab(tmp_path / "lab", engine="embedded", auth="password", **IDS) as s:
        yield s


def _link(lab: SecuredLab, who: str, cid: str | None = None, **kw: object) -> MqttLink:
    return MqttLink(lab.url, cid or who, security=lab.security(who), protocol=311, **kw)  # type: ignore[arg-type]


class Watch:
    """Messages ``link`` receives on ``topic`` (paho's thread appends)."""

    def __init__(self, link: MqttLink, topic: str) -> None:
        self.link, self.got = link, []  # type: list[Message]
        self.event = threading.Event()
        link.subscribe(topic, self._on)
        link.connect()

    def _on(self, m: Message) -> None:
        self.got.append(m)
        self.event.set()


def test_every_role_connects_with_its_password_and_a_wrong_one_is_refused(
    lab: SecuredLab,
) -> None:
    for who in ("e1", "d1", "ops"):
        link = _link(lab, who)
        link.connect(5)
        link.close()
    good = lab.security("d1")
    wrong = lab.dir / "wrong.password"
    wrong.write_text("not-the-password\n")
    bad = MqttSecurity(ca_file=good.ca_file, username="d1", password_file=wrong)
    with pytest.raises(BrokerAuthError, match="refused"):
        MqttLink(lab.url, "d1", security=bad, protocol=311).connect(5)
    anon = MqttSecurity(ca_file=good.ca_file)  # TLS, no credentials
    with pytest.raises(BrokerAuthError):
        MqttLink(lab.url, "d1", security=anon, protocol=311).connect(5)


def test_a_refused_connect_naming_a_client_id_leaves_that_session_alone(
    lab: SecuredLab,
) -> None:
    """amqtt drops (clean session) or hands over (persistent session) the session of the
    CONNECT's client id before it checks any credential: a stranger with a wrong password
    and client id d1 must not cost d1 its subscription."""
    d1 = Watch(_link(lab, "d1"), T.device_inbox("d1", "+"))
    e1 = _link(lab, "e1")
    e1.connect()
    broker = lab.embedded[0]
    try:
        wrong = lab.dir / "wrong.password"
        wrong.write_text("guess\n")
        for clean in (True, False):
            c = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id="d1",
                protocol=MQTTProtocolVersion.MQTTv311,
                clean_session=clean,
            )
            c.tls_set(ca_certs=str(lab.security("d1").ca_file))
            c.username_pw_set("d1", "guess")
            rc: list[object] = []
            c.on_connect = lambda *a, rc=rc: rc.append(a[3])  # type: ignore[misc]
            c.connect("127.0.0.1", lab.ports[0])
            c.loop_start()
            end = time.monotonic() + 5
            while not rc and time.monotonic() < end:
                time.sleep(0.02)
            c.loop_stop()
            c.disconnect()
            assert rc and getattr(rc[0], "is_failure", False), rc
        e1.publish(T.device_inbox("d1", "e1"), b"still here")
        assert d1.event.wait(5), "d1 lost its subscription to a refused CONNECT"
        assert d1.link.connected
        refused = broker.refused_connects
        assert refused >= 2
        assert not [cid for cid in broker.session_ids() if cid.startswith("refused-")]
    finally:
        d1.link.close()
        e1.close()


def test_a_will_on_a_topic_the_client_may_not_write_is_refused(lab: SecuredLab) -> None:
    """mallory (a device) asks for a retained Will "offline" on e1's status and vanishes: amqtt
    would publish it unchecked; the broker refuses the CONNECT, e1 stays online."""
    edge = _link(
        lab,
        "e1",
        will=(T.edge_status("e1"), EdgeStatus(state="offline", edge="e1").to_json(), True),
    )
    edge.connect()
    edge.publish(T.edge_status("e1"), EdgeStatus(state="online", edge="e1").to_json(), retain=True)
    watch = Watch(_link(lab, "ops"), T.edge_status("e1"))
    try:
        assert watch.event.wait(5)
        forged = EdgeStatus(state="offline", edge="e1").to_json()
        thief = _link(lab, "mallory", will=(T.edge_status("e1"), forged, True))
        with pytest.raises(BrokerAuthError):
            thief.connect(5)
        # and a raw socket that connects with the same Will, then dies, publishes nothing
        _raw_connect_with_will_then_die(lab, "mallory", T.edge_status("e1"), forged)
        time.sleep(0.5)
        states = [EdgeStatus.parse(m.payload) for m in watch.got]
        assert all(s is not None and s.state == "online" for s in states)
    finally:
        watch.link.close()
        edge.close()


def test_a_client_that_sends_no_connect_is_closed(lab: SecuredLab) -> None:
    """A TLS connection that never sends a CONNECT (amqtt would wait on it for good, a slot
    held per idle socket) is closed by the broker after its CONNECT deadline."""
    from broker._amqtt_identity import CONNECT_TIMEOUT_S

    ctx = ssl.create_default_context(cafile=str(lab.security("d1").ca_file))
    socks = []
    try:
        for _ in range(3):  # a few idle ones at once: each gets its own deadline
            raw = socket.create_connection(("127.0.0.1", lab.ports[0]), 5)
            socks.append(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
        for s in socks:
            s.settimeout(CONNECT_TIMEOUT_S + 5)
            assert s.recv(1) == b""  # closed by the broker, not timed out here
    finally:
        for s in socks:
            s.close()
    link = _link(lab, "d1")  # and the broker still serves
    link.connect(5)
    link.close()


def _raw_connect_with_will_then_die(lab: SecuredLab, who: str, topic: str, will: bytes) -> None:
    password = lab.security(who).read_password()
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=who, protocol=MQTTProtocolVersion.MQTTv311
    )
    c.tls_set(ca_certs=str(lab.security(who).ca_file))
    c.username_pw_set(who, password)
    c.will_set(topic, will, qos=1, retain=True)
    c.connect("127.0.0.1", lab.ports[0])
    c.loop(1.0)  # CONNECT out, CONNACK (refusal) in
    sock = c.socket()
    if isinstance(sock, (socket.socket, ssl.SSLSocket)):
        sock.close()  # no DISCONNECT: a Will would fire now


def test_the_cli_runs_the_secured_embedded_broker_from_the_setup(tmp_path: Path) -> None:
    """`iotoffload security init` then `iotoffload broker --secured DIR`: the URL the agents'
    configs name works with their credentials."""
    d = tmp_path / "lab"
    port = free_port()
    init = subprocess.run(
        [IOTOFFLOAD, "security", "init", str(d), "--edges", "e1", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    assert f"iotoffload broker --secured {d}" in " ".join(init.stdout.split())  # rich wraps
    proc = subprocess.Popen(
        [IOTOFFLOAD, "broker", "--secured", str(d)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import tomllib

        cfg = tomllib.loads((d / "agents" / "e1.toml").read_text())
        assert cfg["edge"]["broker"] == f"mqtts://127.0.0.1:{port}"
        link = MqttLink(cfg["edge"]["broker"], "e1", security=MqttSecurity.load(cfg["mqtt"]))
        link.connect(10)  # MQTT 5 first: the broker drops it, 3.1.1 follows
        assert link.protocol == 311
        link.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "TLS, identities, ACL" in " ".join(out.split()), out
