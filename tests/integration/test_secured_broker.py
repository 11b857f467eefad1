"""The secured deployment end to end: `iotoffload security init` writes the PKI, the ACL and
the mosquitto configuration; a real mosquitto runs it; every role connects and does its job;
and every attack class of the threat model fails (each test fails if its attack succeeds).

Identities: edges e1 and e2, device d1, app app1, operator ops, and mallory: a device of
the deployment gone rogue (authenticated, with a device's rights, nothing more).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model import ModelPackage
from iotoffload.model.preprocess import normalize_pixels
from iotoffload.runtime import TFLiteExecutor
from iotoffload.transport.frame import (
    Error,
    Hello,
    Inventory,
    PeerFetch,
    Pixels,
    Query,
    Result,
    decode,
    encode,
    encode_tensor_frame,
)
from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.security import BrokerAuthError, MqttSecurity
from iotoffload.transport.status import EdgeStatus
from iotoffload.transport.topics import Topics
from tests.integration.secure import SecuredLab

pytestmark = pytest.mark.integration
T = Topics()


@dataclass
class Lab:
    url: str
    dir: Path
    engine: str

    def security(self, who: str) -> MqttSecurity:
        table = tomllib.loads((self.dir / "agents" / f"{who}.toml").read_text())["mqtt"]
        return MqttSecurity.load(table)

    @property
    def protocol(self) -> int:
        """amqtt speaks only 3.1.1 (an MQTT 5 client falls back, but only after a wait)."""
        return 311 if self.engine == "embedded" else 5

    def link(self, who: str, client_id: str | None = None) -> MqttLink:
        cid = client_id or f"{who}-raw"
        return MqttLink(self.url, cid, security=self.security(who), protocol=self.protocol)


@pytest.fixture(scope="module", params=["mosquitto", "embedded"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The setup security init writes, run by mosquitto or by the embedded broker
    (``iotoffload broker --secured DIR``): every attack must fail on both."""
    d = tmp_path_factory.mktemp("lab")
    ids = {
        "edges": ("e1", "e2"),
        "devices": ("d1", "mallory"),
        "apps": ("app1",),
        "operators": ("ops",),
    }
    with SecuredLab(d, engine=request.param, **ids) as s:
        yield Lab(s.url, d, request.param)


class Inbox:
    """Everything a raw client receives on its subscriptions (paho's thread appends)."""

    def __init__(self, link: MqttLink, *topics: str) -> None:
        self.link = link
        self.got: list[Message] = []
        self._cond = threading.Condition()
        for t in topics:
            link.subscribe(t, self._on)
        link.connect()

    def _on(self, m: Message) -> None:
        with self._cond:
            self.got.append(m)
            self._cond.notify_all()

    def frames(self) -> list[object]:
        with self._cond:
            return [decode(m.payload)[0] for m in self.got if m.payload[:4] == b"IOTO"]

    def wait_for(self, pred: object, timeout: float = 10.0) -> Message:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.got:
                    if pred(m):  # type: ignore[operator]
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"nothing matching within {timeout} s: {self.got!r}")
                self._cond.wait(left)


def _start_edge(lab: Lab, who: str, peer: str, tmp_path: Path) -> EdgeAgent:
    """Edge ``who`` with its own credentials and ``peer`` as its one peer edge."""
    e = EdgeAgent(
        EdgeConfig(
            id=who,
            broker=lab.url,
            store=tmp_path / who,
            advertise=False,
            peer_edges=[peer],
            status_interval=0.5,
            protocol=lab.protocol,
        ),
        lab.security(who),
    )
    e.start()
    return e


@pytest.fixture
def edge(lab: Lab, tmp_path: Path) -> Iterator[EdgeAgent]:
    e = _start_edge(lab, "e1", "e2", tmp_path)
    yield e
    e.stop()


@pytest.fixture
def device(lab: Lab, edge: EdgeAgent, mobilenet: ModelPackage) -> Iterator[DeviceAgent]:
    d = DeviceAgent(
        mobilenet,
        lab.url,
        "e1",
        device_id="d1",
        split=9,
        deadline_ms=5000,
        security=lab.security("d1"),
        protocol=lab.protocol,
        operators=["ops"],
        allowed_edges=["e1", "e2"],
    )
    try:
        assert d.connect() is not None
        d.upload()
        assert not d.upload_errors
        yield d
    finally:
        d.close()


X = np.random.default_rng(7).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)


def _offloads(dev: DeviceAgent, mobilenet: ModelPackage, n: int = 3) -> None:
    """``n`` queries, each offloaded and equal to the local result."""
    want = TFLiteExecutor.from_package(mobilenet).run(0, mobilenet.num_blocks, X)
    for i in range(n):
        out = dev.query(X, i)
        assert out.offloaded and out.edge == "e1", out.reason
        np.testing.assert_allclose(out.output, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


# every role works -------------------------------------------------------------------------------


def test_every_role_connects_and_does_its_job(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    _offloads(device, mobilenet)
    # an app: the model's inventory and a whole-model query, answered in its own inbox
    app = Inbox(lab.link("app1"), T.device_inbox("app1", "+"), T.device_results("+"))
    try:
        mid = mobilenet.manifest.model_id
        app.link.publish(T.edge_control("e1", "app1"), encode(Hello(device="app1", model_id=mid)))
        app.wait_for(lambda m: isinstance(decode(m.payload)[0], Inventory))
        q = encode_tensor_frame(
            Query,
            X,
            request_id="app-1",
            device="app1",
            model_id=mid,
            start=0,
            end=mobilenet.num_blocks,
            deadline_ms=10_000,
        )
        app.link.publish(T.edge_query("e1", "app1"), q)
        got = app.wait_for(lambda m: isinstance(decode(m.payload)[0], Result))
        assert got.topic == T.device_inbox("app1", "e1")
    finally:
        app.link.close()
    # an operator moves the device's preference (to an edge its policy allows)
    ops = lab.link("ops")
    ops.connect()
    try:
        ops.publish(T.device_control("d1", "ops"), json.dumps({"prefer": "e2"}))
        _wait(lambda: device.prefer == "e2", "the operator's command taken")
        ops.publish(T.device_control("d1", "ops"), json.dumps({"prefer": None}))
        _wait(lambda: device.prefer is None, "released")
    finally:
        ops.close()


def _wait(cond: object, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_wrong_password_or_a_stranger_certificate_is_refused(lab: Lab, tmp_path: Path) -> None:
    import trustme

    other = trustme.CA()
    leaf = other.issue_cert("x.test", common_name="d1")  # the right name, the wrong CA
    cert, key = tmp_path / "x.pem", tmp_path / "x.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    sec = MqttSecurity(ca_file=lab.dir / "ca.crt", cert_file=cert, key_file=key)
    with pytest.raises(BrokerAuthError):
        MqttLink(lab.url, "x", security=sec).connect(5)
    anon = MqttSecurity(ca_file=lab.dir / "ca.crt")  # TLS, no client certificate
    with pytest.raises(BrokerAuthError):
        MqttLink(lab.url, "y", security=anon).connect(5)


# the attacks ------------------------------------------------------------------------------------


def test_forged_results_never_answer_a_query(
    lab: Lab,
    edge: EdgeAgent,
    device: DeviceAgent,
    mobilenet: ModelPackage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Request ids are guessable (d1-1, d1-2, ...). For each query, while its slot is open and
    before the real query leaves, mallory (a device) forges e1's result into d1's inbox (the
    ACL must drop it) and e2 (a real edge, not asked) sends its own (the device must drop it).
    Every query still gets e1's correct answer."""
    bad = np.full(mobilenet.manifest.blocks[-1].output.shape, 1e6, np.float32)
    mallory, e2 = lab.link("mallory"), lab.link("e2")
    for link in (mallory, e2):
        link.connect()
    answers = device.queries.pending.answers
    real_open = answers.open
    forged = 0

    def open_and_forge(rid: str, source: str | None = None, expect: object = None) -> object:
        nonlocal forged
        fut = real_open(rid, source, expect)
        frame = encode_tensor_frame(Result, bad, request_id=rid, queue_ms=0, exec_ms=0)
        seen = device.router.refused
        mallory.publish(T.device_inbox("d1", "e1"), frame).wait_for_publish(2)
        e2.publish(T.device_inbox("d1", "e2"), frame).wait_for_publish(2)
        _wait(lambda: device.router.refused > seen, "e2's forged result dropped by the device")
        forged += 1
        return fut

    monkeypatch.setattr(answers, "open", open_and_forge)
    try:
        _offloads(device, mobilenet, n=5)
    finally:
        monkeypatch.undo()
        mallory.close()
        e2.close()
    assert forged == 5 and device.router.refused >= 5


def test_a_result_of_the_wrong_shape_from_the_edge_asked_is_refused(
    device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    """Even the edge asked cannot answer with another shape than the manifest's (unit level:
    the device's router, as paho's thread calls it)."""
    answers = device.queries.pending.answers
    out = mobilenet.manifest.blocks[-1].output
    fut = answers.open("d1-x", "e1", (out.dtype, tuple(out.shape)))
    wrong = encode_tensor_frame(
        Result, np.zeros((1, 3), np.float32), request_id="d1-x", queue_ms=0, exec_ms=0
    )
    device.router.on_inbox_message(Message(T.device_inbox("d1", "e1"), wrong))
    assert not fut.done()
    right = encode_tensor_frame(
        Result, np.zeros(out.shape, np.float32), request_id="d1-x", queue_ms=0, exec_ms=0
    )
    device.router.on_inbox_message(Message(T.device_inbox("d1", "e2"), right))  # not asked
    assert not fut.done()
    device.router.on_inbox_message(Message(T.device_inbox("d1", "e1"), right))
    assert fut.done()


def test_forged_status_offline_inventory_and_errors_change_nothing(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    mallory = lab.link("mallory")
    mallory.connect()
    mid = mobilenet.manifest.model_id
    try:
        offline = EdgeStatus(edge="e1", state="offline").model_dump_json()
        mallory.publish(T.edge_status("e1"), offline, retain=True)
        evil = EdgeStatus(
            edge="evil", state="online", broker="mqtt://127.0.0.1:1"
        ).model_dump_json()
        mallory.publish(T.edge_status("evil"), evil, retain=True)
        inv = Inventory(model_id=mid, known=False, edge="e1")
        mallory.publish(T.device_inbox("d1", "e1"), encode(inv))
        err = Error(code="internal", message="forged", edge="e1", block=0, chunk=0)
        mallory.publish(T.device_inbox("d1", "e1"), encode(err))
        time.sleep(1.0)
    finally:
        mallory.close()
    # the retained status is still the edge's own, and nobody sees the forged edge
    seen = Inbox(lab.link("ops"), T.edge_status_all())
    try:
        m = seen.wait_for(lambda m: m.topic == T.edge_status("e1"))
        st = EdgeStatus.parse(m.payload)
        assert st is not None and st.state == "online"
        time.sleep(0.3)
        assert all(m.topic != T.edge_status("evil") for m in seen.got)
    finally:
        seen.link.close()
    assert device.candidates.get("evil") is None
    c = device.candidates.get("e1")
    assert c is not None and c.online
    assert device.session.known and not device.upload_errors
    _offloads(device, mobilenet)


def test_a_move_cannot_be_forced_through_the_control_topic(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    mallory = lab.link("mallory")
    mallory.connect()
    try:
        cmd = json.dumps({"prefer": "e2"})
        mallory.publish(T.device_control("d1", "mallory"), cmd)  # ACL: not an operator
        mallory.publish(T.device_control("d1", "ops"), cmd)  # ACL: not its identity
        time.sleep(1.0)
    finally:
        mallory.close()
    assert device.prefer is None
    # an operator cannot move it to an edge its policy does not allow either
    ops = lab.link("ops")
    ops.connect()
    try:
        ops.publish(T.device_control("d1", "ops"), json.dumps({"prefer": "evil"}))
        ops.publish(T.device_control("d1", "ops"), json.dumps({"prefer": "e1"}))
        _wait(lambda: device.prefer == "e1", "the allowed command after the refused one")
    finally:
        ops.close()
    _offloads(device, mobilenet, n=1)


def test_a_peer_fetch_from_a_non_peer_pushes_nothing(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent
) -> None:
    mid = device.pkg.manifest.model_id
    spy = Inbox(lab.link("mallory"), T.edge_upload("mallory", "+"), T.edge_upload("e2", "+"))
    try:
        fetch = PeerFetch(peer="mallory", device="d1", model_id=mid, blocks=list(range(18)))
        spy.link.publish(T.edge_control("e1", "mallory"), encode(fetch))
        as_e2 = PeerFetch(peer="e2", device="d1", model_id=mid, blocks=[0])
        spy.link.publish(T.edge_control("e1", "mallory"), encode(as_e2))  # claims e2
        spy.link.publish(T.edge_control("e1", "e2"), encode(as_e2))  # ACL: not its identity
        _wait(lambda: edge.peers.refused_fetches == 2, "both fetches refused")
        time.sleep(0.5)
        assert edge.peers.blocks_pushed == 0 and spy.got == []
    finally:
        spy.link.close()


def test_a_client_id_takeover_neither_kicks_the_edge_nor_fires_its_will(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    watch = Inbox(lab.link("ops"), T.edge_status("e1"))
    try:
        watch.wait_for(lambda m: True)  # the retained online status
        for cid in ("edge-e1", "e1", "device-d1", "d1"):
            thief = lab.link("mallory", client_id=cid)
            thief.connect()
            thief.close()
        time.sleep(1.0)
        states = [EdgeStatus.parse(m.payload) for m in watch.got]
        assert all(s is not None and s.state == "online" for s in states), [
            s and s.state for s in states
        ]
        assert edge.link is not None and edge.link.connected
    finally:
        watch.link.close()
    _offloads(device, mobilenet, n=2)


def test_another_devices_inbox_cannot_be_read(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    spy = Inbox(
        lab.link("mallory"),
        T.device_inbox("d1", "+"),
        "iotoffload/v2/devices/#",
        "#",
        T.edge_query("e1", "+"),
        T.edge_upload("e1", "+"),
    )
    try:
        _offloads(device, mobilenet, n=3)
        time.sleep(0.3)
        leaked = [m.topic for m in spy.got if m.topic != T.edge_status("e1")]
        assert all(not t.startswith(T.prefix + "/edges/e1/status") for t in leaked)
        assert not [t for t in leaked if "/d1/" in t or t.endswith("/d1")], leaked
    finally:
        spy.link.close()


def test_a_device_cannot_publish_as_another_device(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    mid = mobilenet.manifest.model_id
    spy = Inbox(lab.link("mallory"), T.device_inbox("mallory", "+"))
    try:
        x = np.zeros(mobilenet.manifest.input.shape, np.float32)
        q = encode_tensor_frame(
            Query,
            x,
            request_id="m-1",
            device="d1",
            model_id=mid,
            start=0,
            end=18,
            deadline_ms=5000,
        )
        before = edge.stats.queries
        spy.link.publish(T.edge_query("e1", "d1"), q)  # ACL: dropped
        spy.link.publish(T.edge_query("e1", "mallory"), q)  # claims d1: refused, to mallory
        m = spy.wait_for(lambda m: isinstance(decode(m.payload)[0], Error))
        e = decode(m.payload)[0]
        assert isinstance(e, Error) and e.code == "forbidden" and e.request_id == "m-1"
        assert edge.stats.queries == before
        assert edge.stats.error_codes.get("forbidden") == 1
    finally:
        spy.link.close()
    _offloads(device, mobilenet, n=1)


# apps -------------------------------------------------------------------------------------------


def test_the_app_client_finds_the_edge_learns_the_model_and_queries_it(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    from iotoffload.client import AppClient, QueryError

    mid = mobilenet.manifest.model_id
    with AppClient(lab.url, security=lab.security("app1")) as app:
        assert app.id == "app1"  # from its certificate's CN
        online = app.edges()
        assert [s.edge for s in online] == ["e1"] and mid in online[0].models
        inv = app.inventory("e1", mid)
        assert inv.known and inv.blocks == mobilenet.num_blocks
        assert inv.name == mobilenet.manifest.name
        assert inv.input is not None and tuple(inv.input.shape) == (1, 224, 224, 3)
        want = TFLiteExecutor.from_package(mobilenet).run(0, mobilenet.num_blocks, X)
        y = app.query("e1", mid, X, inventory=inv)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
        # an image's pixels, normalised by the edge: the float32 query's answer exactly
        prep = mobilenet.manifest.preprocessing
        assert prep is not None
        px = np.random.default_rng(5).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        p = Pixels(mean=list(prep.mean), std=list(prep.std))
        by_px = app.query("e1", mid, px, inventory=inv, pixels=p)
        xf = normalize_pixels(px, prep.mean, prep.std)
        assert np.array_equal(by_px, app.query("e1", mid, xf, inventory=inv))
        with pytest.raises(QueryError) as e:
            app.query("e1", "0" * 64, X, inventory=inv)
        assert e.value.code == "unknown_model"
        with pytest.raises(ValueError, match="shape"):
            app.query("e1", mid, X[:, :10], inventory=inv)


def test_the_third_party_example_runs_on_the_secured_broker(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage
) -> None:
    """examples/third_party_client.py (plain paho, no iotoffload import) with the app's
    certificate: the inventory and a whole-model query's top-5."""
    import sys

    d = lab.dir / "agents"
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[2] / "examples" / "third_party_client.py"),
            "--broker",
            lab.url,
            "--edge",
            "e1",
            "--package",
            str(mobilenet.root),
            "--device-id",
            "app1",
            "--protocol",
            "311" if lab.engine == "embedded" else "5",  # amqtt speaks 3.1.1
            "--ca-file",
            str(lab.dir / "ca.crt"),
            "--cert-file",
            str(d / "app1.crt"),
            "--key-file",
            str(d / "app1.key"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "inventory: known=True" in out.stdout and "1. " in out.stdout


# discovery --------------------------------------------------------------------------------------


def test_spoofed_zeroconf_records_and_goodbyes_do_not_move_the_device(
    lab: Lab,
    edge: EdgeAgent,
    mobilenet: ModelPackage,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real zeroconf on 127.0.0.1. An attacker advertises e2 on a broker of its own (TLS with
    another CA) and on a plain broker, and sends an mDNS goodbye for e1: the device verifies
    the first against its CA and refuses it with one log line, ignores the plain one, and keeps
    e1, whose retained status still says online."""
    from iotoffload.discovery.zc import EdgeAdvertiser
    from tests.integration.secure import SecureMosquitto

    dev = DeviceAgent(
        mobilenet,
        lab.url,
        "e1",
        device_id="d1",
        split=9,
        deadline_ms=5000,
        security=lab.security("d1"),
        protocol=lab.protocol,
        allowed_edges=["e1", "e2", "e3"],
        interface="127.0.0.1",
    )
    gone: list[tuple[str, bool]] = []
    real_gone = dev.candidates.gone

    def spy_gone(edge_id: str) -> bool:
        went = real_gone(edge_id)
        gone.append((edge_id, went))
        return went

    monkeypatch.setattr(dev.candidates, "gone", spy_gone)
    ads: list[EdgeAdvertiser] = []
    with SecureMosquitto(tmp_path / "evil") as evil:
        try:
            assert dev.connect() is not None
            dev.upload()
            _offloads(dev, mobilenet, n=1)
            for eid, url in (("e2", evil.url), ("e3", "mqtt://127.0.0.1:1883")):
                ad = EdgeAdvertiser(eid, url, "127.0.0.1")
                ad.register()
                ads.append(ad)
            fake_e1 = EdgeAdvertiser("e1", lab.url, "127.0.0.1")
            fake_e1.register()
            _wait(
                lambda: (c := dev.candidates.get("e1")) is not None and "zeroconf" in c.sources,
                "the device saw the e1 record",
            )
            fake_e1.close()  # the goodbye
            _wait(lambda: ("e1", False) in gone, "the goodbye reached the device", 15)
            _wait(
                lambda: any("fails verification" in r.getMessage() for r in caplog.records),
                "the device refused e2's broker at its TLS check",
                20,
            )
            assert any("e3" in r.getMessage() and "plain" in r.getMessage() for r in caplog.records)
            assert dev.candidates.get("e3") is None
            c = dev.candidates.get("e1")
            assert c is not None and c.online
            _offloads(dev, mobilenet, n=2)
            assert dev.session.edge_id == "e1"
        finally:
            for ad in ads:
                ad.close()
            dev.close()


# handoff ----------------------------------------------------------------------------------------


def test_a_handoff_on_the_secured_broker_moves_the_blocks_edge_to_edge(
    lab: Lab, edge: EdgeAgent, device: DeviceAgent, mobilenet: ModelPackage, tmp_path: Path
) -> None:
    """e1 and e2 are each other's peers (security init's configs say so); an operator moves
    d1 to e2, which fetches every block from e1 through the ACL (fetch on e1's control topic
    as e2, pushes on e2's upload topic as e1); no query is lost, none is answered twice."""
    e2 = _start_edge(lab, "e2", "e1", tmp_path)
    ops = lab.link("ops")
    ops.connect()
    try:
        _offloads(device, mobilenet, n=2)
        _wait(lambda: "e2" in device.sessions, "the device saw e2's status")
        ops.publish(T.device_control("d1", "ops"), json.dumps({"prefer": "e2"}))
        _wait(lambda: device.edge_id == "e2", "the move to e2", 15)
        full = frozenset(range(mobilenet.num_blocks))
        _wait(lambda: device.sessions["e2"].stored == full, "every block on e2", 30)
        want = TFLiteExecutor.from_package(mobilenet).run(0, mobilenet.num_blocks, X)
        for i in range(3):
            out = device.query(X, 10 + i)
            assert out.offloaded and out.edge == "e2", out.reason
            np.testing.assert_allclose(
                out.output, want, rtol=0, atol=1e-4 * float(np.abs(want).max())
            )
        assert e2.stats.blocks_from_peers == mobilenet.num_blocks
        assert edge.peers.blocks_pushed == mobilenet.num_blocks
        assert device.sessions["e2"].bytes_uploaded == 0  # the device sent e2 nothing
        assert device.queries.pending.late_answers == 0
    finally:
        ops.close()
        e2.stop()
