"""Handoff between two real edges on loopback: real brokers, real zeroconf on 127.0.0.1.

Each test runs on plain brokers and on the secured deployment (``iotoffload security init``:
TLS, a client certificate per identity, the ACL by role), where the edges fetch and push
blocks through the ACL with their own credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from broker.embedded import EmbeddedBroker
from device_agent.agent import DeviceAgent, QueryOutcome
from device_agent.handoff import HandoffPolicy
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model import ModelPackage
from iotoffload.runtime import TFLiteExecutor
from iotoffload.runtime.base import Array
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.security import MqttSecurity
from tests.integration.conftest import Mosquitto
from tests.integration.secure import SecuredLab

pytestmark = pytest.mark.integration
IFACE = os.environ["IOTOFFLOAD_INTERFACE"]
SPLIT = 12


def _uid(name: str) -> str:
    return f"{name}-{os.getpid()}-{time.monotonic_ns() % 10**6}"


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Net:
    """Where a test's two edges run: edge A on ``url_a``, edge B on ``url_b`` (one broker
    when they are equal), and, on the secured deployment, each identity's credentials."""

    url_a: str
    url_b: str
    protocol: int
    a_id: str
    b_id: str
    lab: SecuredLab | None = None

    def sec(self, who: str) -> MqttSecurity | None:
        return self.lab.security(who) if self.lab is not None else None

    def edge(self, eid: str, url: str, store: Path, **kw: object) -> EdgeAgent:
        a = EdgeAgent(
            EdgeConfig(
                id=eid,
                broker=url,
                store=store,
                interface=IFACE,
                protocol=self.protocol,
                status_interval=0.5,
                **{"peer_edges": ["*"], **kw},  # type: ignore[arg-type]
            ),
            self.sec(eid),
        )
        a.start()
        return a

    def device(self, pkg: ModelPackage, edge: str, who: str = "dev", **kw: object) -> DeviceAgent:
        return DeviceAgent(
            pkg,
            self.url_a,
            edge,
            split=SPLIT,
            protocol=self.protocol,
            device_id=who,
            security=self.sec(who),
            **kw,  # type: ignore[arg-type]
        )


def _net(kind: str, tmp_path: Path, stack: ExitStack) -> Net:
    a_id, b_id = _uid("edge-a"), _uid("edge-b")  # unique: zeroconf on 127.0.0.1 is shared
    if kind == "own-mosquittos":  # each edge behind its own broker; the device holds both
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        ma = stack.enter_context(Mosquitto(tmp_path / "a"))
        mb = stack.enter_context(Mosquitto(tmp_path / "b"))
        return Net(ma.url, mb.url, 5, a_id, b_id)
    if kind == "shared-embedded":
        url = stack.enter_context(EmbeddedBroker()).url
        return Net(url, url, 311, a_id, b_id)  # amqtt speaks MQTT 3.1.1
    ids = {"edges": (a_id, b_id), "devices": ("dev", "seeder"), "operators": ("ops",)}
    if kind == "own-secured":  # two brokers, one PKI and ACL
        lab = stack.enter_context(SecuredLab(tmp_path / "lab", brokers=2, **ids))
        return Net(lab.urls[0], lab.urls[1], 5, a_id, b_id, lab)
    assert kind == "shared-secured"
    lab = stack.enter_context(SecuredLab(tmp_path / "lab", **ids))
    return Net(lab.url, lab.url, 5, a_id, b_id, lab)


@pytest.fixture(params=["own-mosquittos", "own-secured"])
def two_brokers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    """Each edge behind its own broker (the device holds a connection to both)."""
    with ExitStack() as stack:
        yield _net(request.param, tmp_path, stack)


@pytest.fixture(params=["shared-embedded", "shared-secured"])
def one_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    """Both edges and the device on one broker."""
    with ExitStack() as stack:
        yield _net(request.param, tmp_path, stack)


def _local(pkg: ModelPackage, x: Array) -> Array:
    return TFLiteExecutor.from_package(pkg).run(0, pkg.num_blocks, x)


def _run(dev: DeviceAgent, x: Array, first: int, count: int) -> list[QueryOutcome]:
    return [dev.query(x, first + i) for i in range(count)]


def test_edge_killed_mid_stream_every_query_answered_and_device_moves_to_b(
    mobilenet: ModelPackage, two_brokers: Net, tmp_path: Path
) -> None:
    net = two_brokers
    a_id, b_id = net.a_id, net.b_id
    secured = ["--config", str(net.lab.config(a_id))] if net.lab is not None else []
    edge_a = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "start",
            *secured,
            "--broker",
            net.url_a,
            "--id",
            a_id,
            "--store",
            str(tmp_path / "sa"),
            "--no-advertise",
            "--protocol",
            "5",
        ],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    edge_b = net.edge(b_id, net.url_b, tmp_path / "sb")  # advertised by zeroconf on 127.0.0.1
    policy = HandoffPolicy(miss_limit=2, hold_s=0)
    dev = net.device(
        mobilenet,
        a_id,
        deadline_ms=400,
        interface=IFACE,
        handoff=policy,
        probe_interval=0.5,
    )
    try:
        end = time.monotonic() + 20
        while dev.connect(timeout=2) is None and time.monotonic() < end:
            time.sleep(0.2)
        dev.start_upload()
        assert dev.wait_upload(60)
        x = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
        want = _local(mobilenet, x)
        before = _run(dev, x, 0, 3)
        assert all(o.offloaded and o.edge == a_id for o in before)
        _wait(lambda: dev.candidates.get(b_id) is not None, 10, "B found by zeroconf")
        edge_a.kill()  # SIGKILL: no goodbye; the LWT comes only after the keepalive
        edge_a.wait(5)
        outs: list[QueryOutcome] = []
        end = time.monotonic() + 60
        while time.monotonic() < end and not (outs and outs[-1].edge == b_id):
            outs.append(dev.query(x, 3 + len(outs)))
            time.sleep(0.05)
        assert dev.edge_id == b_id, dev.handoffs
        assert outs[-1].offloaded and outs[-1].edge == b_id
        for o in before + outs:  # every query answered, once, with the right result
            np.testing.assert_allclose(o.output, want, rtol=0, atol=1e-4)
        assert [o.index for o in before + outs] == list(range(3 + len(outs)))
        assert {o.reason for o in outs if not o.offloaded} <= {
            "deadline passed",
            "edge offline",
            "edge went offline",
            "blocks not uploaded yet",
        }
        h = dev.handoffs[0]
        assert (h.source, h.target) == (a_id, b_id) and h.transfer == 0  # A is dead: no transfer
        assert "miss" in h.reason or "offline" in h.reason
    finally:
        dev.close()
        if edge_a.poll() is None:
            edge_a.kill()
            edge_a.wait(5)
        edge_b.stop()


@pytest.mark.parametrize("layout", ["own-mosquittos", "shared-embedded", "own-secured"])
def test_graceful_move_b_gets_blocks_from_a_and_device_sends_none_twice(
    mobilenet: ModelPackage, tmp_path: Path, layout: str
) -> None:
    with ExitStack() as stack:
        net = _net(layout, tmp_path, stack)
        a_id, b_id = net.a_id, net.b_id
        edge_a = net.edge(a_id, net.url_a, tmp_path / "sa", advertise=False)
        stack.callback(edge_a.stop)
        edge_b = net.edge(b_id, net.url_b, tmp_path / "sb", peer_brokers=[net.url_a])
        stack.callback(edge_b.stop)
        # A's copy of one block rots on disk: it must not be pushed; the device sends it
        # a long stall time: the block A refuses must come from the device at once, on A's
        # error, not after the push stalls
        dev = net.device(
            mobilenet,
            a_id,
            deadline_ms=5000,
            interface=IFACE,
            probe_interval=0.5,
            handoff=HandoffPolicy(dwell_s=0.5, hold_s=0),
            peer_stall_s=120,
        )
        stack.callback(dev.close)
        assert dev.connect() is not None
        dev.start_upload()
        assert dev.wait_upload(60)
        rotten = dev.upload_order()[2]
        path = edge_a.store.block_path(mobilenet.blocks[rotten].onnx_sha256)
        path.write_bytes(path.read_bytes()[:-1] + b"\0")
        x = np.random.default_rng(2).standard_normal((1, 224, 224, 3)).astype(np.float32)
        want = _local(mobilenet, x)
        assert all(o.edge == a_id for o in _run(dev, x, 0, 2))
        sent_to_a = dev.sessions[a_id].bytes_uploaded
        _wait(lambda: b_id in dev.sessions and dev.sessions[b_id].inventory_seen, 10, "B probed")
        time.sleep(1.5)  # a few policy rounds: an empty B must not look faster than A
        assert dev.edge_id == a_id and not dev.handoffs
        dev.set_prefer(b_id)
        _wait(lambda: dev.edge_id == b_id, 15, "the move to B")
        full = frozenset(range(mobilenet.num_blocks))
        _wait(lambda: dev.sessions[b_id].stored == full, 30, "every block on B")
        after = _run(dev, x, 2, 3)
        assert all(o.offloaded and o.edge == b_id for o in after), [o.reason for o in after]
        for o in after:
            np.testing.assert_allclose(o.output, want, rtol=0, atol=1e-4)
        b = dev.sessions[b_id]
        n = mobilenet.num_blocks
        assert b.stored == frozenset(range(n))
        # everything but the rotten block came from A; the device sent only that one
        assert edge_b.stats.blocks_from_peers == n - 1
        assert edge_a.peers.refused_digest == 1
        assert set(b.chunks_sent) == {rotten}
        assert b.bytes_uploaded == mobilenet.blocks[rotten].upload_bytes
        assert dev.sessions[a_id].bytes_uploaded == sent_to_a
        assert dev.handoffs[0].transfer == n


def test_b_holding_the_model_first_query_after_the_move_is_offloaded_on_b(
    mobilenet: ModelPackage, one_broker: Net, tmp_path: Path
) -> None:
    net = one_broker
    a_id, b_id = net.a_id, net.b_id
    with ExitStack() as stack:
        for eid in (a_id, b_id):
            e = net.edge(eid, net.url_a, tmp_path / eid, advertise=False)
            stack.callback(e.stop)
        seeder = net.device(mobilenet, b_id, "seeder")
        stack.callback(seeder.close)
        assert seeder.connect() is not None
        seeder.upload()  # another device left the model on B
        dev = net.device(mobilenet, a_id, deadline_ms=5000, probe_interval=0.5)
        stack.callback(dev.close)
        assert dev.connect() is not None
        dev.start_upload()
        assert dev.wait_upload(60)
        x = np.zeros((1, 224, 224, 3), np.float32)
        assert dev.query(x, 0).edge == a_id
        # the move is asked for on the device's control topic, as an operator's app would
        ctl = MqttLink(net.url_a, "ops", protocol=net.protocol, security=net.sec("ops"))
        ctl.connect()
        ctl.publish(dev.topics.device_control(dev.device_id, "ops"), json.dumps({"prefer": b_id}))
        _wait(lambda: dev.edge_id == b_id, 15, "the move to B")
        ctl.close()
        first = dev.query(x, 1)
        assert first.offloaded and first.edge == b_id, first.reason
        h = dev.handoffs[0]
        assert h.reason == "preferred" and h.target_had == mobilenet.num_blocks
        assert dev.sessions[b_id].bytes_uploaded == 0


def test_refused_transfer_falls_back_to_the_device_upload(
    mobilenet: ModelPackage, two_brokers: Net, tmp_path: Path
) -> None:
    net = two_brokers
    a_id, b_id = net.a_id, net.b_id
    with ExitStack() as stack:
        stack.callback(net.edge(a_id, net.url_a, tmp_path / "sa", advertise=False).stop)
        # A's broker not allowed
        edge_b = net.edge(b_id, net.url_b, tmp_path / "sb", advertise=False)
        stack.callback(edge_b.stop)
        dev = net.device(mobilenet, a_id, deadline_ms=5000)
        stack.callback(dev.close)
        assert dev.connect() is not None
        dev.upload()
        dev.add_edge(b_id, net.url_b)
        assert dev.move_to(b_id, "test")
        full = frozenset(range(mobilenet.num_blocks))
        _wait(lambda: dev.sessions[b_id].stored == full, 60, "every block on B")
        assert dev.handoffs[0].transfer == mobilenet.num_blocks  # asked, and refused
        assert edge_b.stats.blocks_from_peers == 0
        assert dev.sessions[b_id].bytes_uploaded == sum(b.upload_bytes for b in mobilenet.blocks)
        assert edge_b.stats.error_codes["transfer_refused"] == 1
        assert dev.sessions[b_id].peer_failed == full  # the device was told at once
        x = np.zeros((1, 224, 224, 3), np.float32)
        assert dev.query(x).edge == b_id


def test_graceful_stop_of_a_moves_at_once_to_b_holding_the_model(
    mobilenet: ModelPackage, one_broker: Net, tmp_path: Path
) -> None:
    net = one_broker
    a_id, b_id = net.a_id, net.b_id
    with ExitStack() as stack:
        edge_a = net.edge(a_id, net.url_a, tmp_path / "a", advertise=False)
        edge_b = net.edge(b_id, net.url_a, tmp_path / "b", advertise=False)
        stack.callback(edge_b.stop)
        seeder = net.device(mobilenet, b_id, "seeder")
        stack.callback(seeder.close)
        assert seeder.connect() is not None
        seeder.upload()
        dev = net.device(
            mobilenet, a_id, deadline_ms=5000, handoff=HandoffPolicy(), probe_interval=0.5
        )
        stack.callback(dev.close)
        assert dev.connect() is not None
        dev.upload()
        x = np.zeros((1, 224, 224, 3), np.float32)
        assert dev.query(x, 0).edge == a_id
        _wait(lambda: b_id in dev.sessions and dev.sessions[b_id].inventory_seen, 10, "B probed")
        assert dev.edge_id == a_id  # B is no better: no move while A serves
        edge_a.stop()  # graceful: retained status says offline
        _wait(lambda: dev.edge_id == b_id, 10, "the move to B")
        assert dev.handoffs[-1].reason == "current edge offline"
        out = dev.query(x, 1)
        assert out.offloaded and out.edge == b_id
