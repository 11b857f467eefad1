"""The device agent's one loop: regression tests for the defects of the threaded design
(issue 11) — connect twice, concurrent moves, a late reply — on a real mosquitto, and the
pending-reply race on a real asyncio loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from device_agent.queries import PendingReplies
from iotoffload.model import ModelPackage
from iotoffload.model.preprocess import normalize_pixels
from iotoffload.transport.frame import Inventory, Result, WireTensor
from iotoffload.transport.status import EdgeStatus
from tests.device_agent.helpers import ScriptedEdge, inject, inject_message
from tests.integration.conftest import Mosquitto


@pytest.fixture
def mosq(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path) as m:
        yield m


@pytest.fixture
def mosq2(tmp_path: Path) -> Iterator[Mosquitto]:
    (tmp_path / "second").mkdir()
    with Mosquitto(tmp_path / "second") as m:
        yield m


def _device(pkg: ModelPackage, url: str, edge: str, **kw: object) -> DeviceAgent:
    return DeviceAgent(pkg, url, edge, device_ms=[5.0] * pkg.num_blocks, **kw)  # type: ignore[arg-type]


def test_connect_twice_starts_one_watcher_and_one_monitor(
    mobilenet: ModelPackage, mosq: Mosquitto
) -> None:
    edge = ScriptedEdge(mosq.url, "ea", mobilenet)
    dev = _device(mobilenet, mosq.url, "ea", interface="127.0.0.1")
    try:
        assert dev.connect() is not None
        watcher, monitor = dev._watcher, dev._monitor
        threads = {t.ident for t in threading.enumerate()}
        assert dev.connect() is not None  # announces again
        assert dev._watcher is watcher and dev._monitor is monitor
        assert {t.ident for t in threading.enumerate()} <= threads  # nothing new started
        coros = dev.loop.call(lambda: [t.get_coro().__qualname__ for t in asyncio.all_tasks()])
        assert coros.count("HandoffController.run") == 1, coros
        assert dev.connections.opened == 1
    finally:
        dev.close()
        edge.close()


def test_concurrent_moves_open_one_connection_per_broker(
    mobilenet: ModelPackage, mosq: Mosquitto, mosq2: Mosquitto
) -> None:
    a = ScriptedEdge(mosq.url, "ea", mobilenet)
    b = ScriptedEdge(mosq2.url, "eb", mobilenet)
    c = ScriptedEdge(mosq2.url, "ec", mobilenet)
    dev = _device(mobilenet, mosq.url, "ea")
    try:
        dev.connect()
        dev.add_edge("eb", mosq2.url)
        dev.add_edge("ec", mosq2.url)
        results: dict[str, bool] = {}
        go = threading.Barrier(2)

        def move(edge: str) -> None:
            go.wait()
            results[edge] = dev.move_to(edge, "test")

        ts = [threading.Thread(target=move, args=(e,)) for e in ("eb", "ec")]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        assert results == {"eb": True, "ec": True}
        # one link per broker: the second mover waited for the first one's connection
        assert dev.connections.opened == 2
        link = dev.connections.get(f"mqtt://127.0.0.1:{mosq2.port}")
        assert link is not None and dev.sessions["eb"].link is dev.sessions["ec"].link is link
        time.sleep(1.0)  # two clients with one id would kick each other off by now
        assert link.connected
        assert [h.target for h in dev.handoffs] in (["eb", "ec"], ["ec", "eb"])
        assert dev.edge_id == dev.handoffs[-1].target
    finally:
        dev.close()
        for e in (a, b, c):
            e.close()


def test_a_late_reply_is_counted_exactly_once(mobilenet: ModelPackage, mosq: Mosquitto) -> None:
    edge = ScriptedEdge(mosq.url, "slow", mobilenet, delay_s=0.4)
    dev = _device(mobilenet, mosq.url, "slow", split=10, deadline_ms=100)
    try:
        dev.connect()
        x = np.zeros(mobilenet.manifest.input.shape, np.float32)
        out = dev.query(x)
        assert not out.offloaded and out.reason == "deadline passed"
        assert out.output.shape == (1, 1000)  # finished locally: one answer
        end = time.monotonic() + 5
        while dev.late_answers == 0 and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.3)
        assert dev.late_answers == 1 and edge.queries == 1
    finally:
        dev.close()
        edge.close()


class _Session:
    """What PendingReplies needs of an edge session."""

    edge_id = "e"
    online = True

    def __init__(self) -> None:
        self.queries, self.misses, self.timeouts = 0, [], 0

    def query_started(self, _hold: object = None) -> bool:
        self.queries += 1
        return True

    def release(self, _hold: object) -> None:
        pass

    def query_done(self) -> None:
        self.queries -= 1

    def observe(self, _update: object) -> None:
        self.timeouts += 1


def test_pending_reply_race_has_one_winner() -> None:
    """A reply and the deadline in the same loop step: exactly one answers the query; the
    reply that lost is counted as late once; an offline edge and close answer the rest, and a
    query opened after close is answered at once."""
    s = _Session()
    res = Result(
        request_id="r1",
        tensor=WireTensor(dtype="float32", shape=(1,)),
        queue_ms=0.0,
        exec_ms=0.0,
    )
    body = memoryview(b"\0\0\0\0")

    async def scenario() -> tuple[object, ...]:
        p = PendingReplies()
        fut = p.answers.open("r1")
        p.add("r1", s, 0.0)  # type: ignore[arg-type]  # the deadline fires next iteration
        await asyncio.sleep(0.01)
        for _ in range(2):  # the reply, then a duplicate delivery (QoS 1), as the router does
            p.on_result(res, p.answers.answer("r1", (res, body)), time.perf_counter())
        fut2 = p.answers.open("r2")
        p.add("r2", s, 5.0)  # type: ignore[arg-type]
        p.release("e")  # the edge went offline
        fut3 = p.answers.open("r3")
        p.add("r3", s, 5.0)  # type: ignore[arg-type]
        p.close()  # the agent closes
        fut4 = p.answers.open("r4")
        p.add("r4", s, 5.0)  # type: ignore[arg-type]
        assert len(p) == 0 and len(p.answers) == 0
        return fut.result(0), fut2.result(0), fut3.result(0), fut4.result(0), p.late_answers

    *answers, late = asyncio.run(scenario())
    assert answers == ["deadline passed", "edge went offline", "agent closed", "agent closed"]
    assert late == 2 and s.queries == 0 and len(s.misses) == 1 and s.timeouts == 1


@pytest.mark.parametrize("result_post_first", [False, True])
def test_result_that_overtakes_its_registration_is_learned_once(result_post_first: bool) -> None:
    """The network thread answers a query before the loop has run its registration (posted
    right after the publish); its own post may even reach the loop first. Either way the
    caller has the result, the loop finishes the query once, learns from it once, and its
    deadline answers nothing."""
    s = _Session()
    learned: list[str] = []
    res = Result(
        request_id="r1",
        tensor=WireTensor(dtype="float32", shape=(1,)),
        queue_ms=0.0,
        exec_ms=0.0,
    )

    async def scenario() -> object:
        p = PendingReplies(learn=lambda _p, h, _t: learned.append(h.request_id))
        fut = p.answers.open("r1")
        won = p.answers.answer("r1", (res, memoryview(b"\0\0\0\0")))  # network thread
        if result_post_first:
            p.on_result(res, won, time.perf_counter())
            p.add("r1", s, 1.0)  # type: ignore[arg-type]
        else:
            p.add("r1", s, 1.0)  # type: ignore[arg-type]
            p.on_result(res, won, time.perf_counter())
        await asyncio.sleep(0.02)  # past the deadline
        assert len(p) == 0 and p.late_answers == 0 and not p._early
        return fut.result(0)

    h, _ = asyncio.run(scenario())  # type: ignore[misc]
    assert h is res and learned == ["r1"] and s.queries == 0 and s.misses == []


def test_forged_status_and_hostile_inventory_are_refused(mobilenet: ModelPackage) -> None:
    """A status naming another edge than its topic is ignored (one edge cannot speak for
    another); an inventory's chunk lists are bounded to what the block can have."""
    dev = _device(mobilenet, "mqtt://127.0.0.1:9", "e1")
    try:
        forged = EdgeStatus(state="online", edge="e1", broker="mqtt://127.0.0.1:666")
        inject_message(dev, "status", dev.topics.edge_status("evil"), forged.to_json())
        c = dev.candidates.get("e1")
        assert c is not None and c.broker == "mqtt://127.0.0.1:9"  # unchanged
        offline = EdgeStatus(state="offline", edge="e1", broker="mqtt://127.0.0.1:9")
        inject_message(dev, "status", dev.topics.edge_status("evil"), offline.to_json())
        assert dev.candidates.get("e1").online  # type: ignore[union-attr]
        inject_message(dev, "status", dev.topics.edge_status("e1"), offline.to_json())
        assert not dev.candidates.get("e1").online  # type: ignore[union-attr]  # the real one
        b0 = mobilenet.blocks[0]
        n = -(-b0.upload_bytes // dev.chunk_size)
        ours = {0: b0.encoding} if b0.encoding != "identity" else {}
        inv = Inventory(
            model_id=mobilenet.manifest.model_id,
            known=True,
            edge="e1",
            # (negative, huge and out-of-chain indices no longer decode: frame.py bounds them)
            partial={0: [0, 0, n, n + 7], 1000: [0]},
            partial_chunk_size={0: dev.chunk_size},
            partial_encoding=ours,  # type: ignore[arg-type]
        )
        inject(dev, inv)
        assert dev.loop.call(lambda: dict(dev.session._partial)) == {0: [0]}
        # chunks of another encoding than ours (another device's upload): not resumed
        other = {} if ours else {0: "shuffle2-zlib"}
        inject(dev, inv.model_copy(update={"partial_encoding": other}))
        assert dev.loop.call(lambda: dict(dev.session._partial)) == {}
    finally:
        dev.close()


def test_the_monitor_sleeps_while_the_device_has_one_edge(
    mobilenet: ModelPackage, mosq: Mosquitto, mosq2: Mosquitto
) -> None:
    """Alone with its edge, the monitor runs a round per probe interval (2 s), not 4 a
    second; an edge made known wakes it, and with another edge to weigh it ticks again."""
    edge = ScriptedEdge(mosq.url, "ea", mobilenet)
    other = ScriptedEdge(mosq2.url, "eb", mobilenet)
    dev = _device(mobilenet, mosq.url, "ea", interface="127.0.0.1")
    rounds: list[float] = []
    try:
        assert dev.connect() is not None
        mon = dev.mobility
        real = mon._maybe_move

        async def counted(now: float) -> None:
            rounds.append(now)
            await real(now)

        dev.loop.call(lambda: setattr(mon, "_maybe_move", counted))
        time.sleep(1.5)
        alone = len(rounds)
        assert alone <= 2, rounds  # 4 Hz would be 6
        dev.add_edge("eb", mosq2.url)
        end = time.monotonic() + 5.0  # 3 rounds take 0.5 s at the tick: room for a busy CI
        while len(rounds) - alone < 3 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(rounds) - alone >= 3, rounds  # woken, then ticking with two edges
    finally:
        dev.close()
        other.close()
        edge.close()


def test_an_edge_that_refuses_pixels_gets_float32_from_then_on(
    mobilenet: ModelPackage, mosq: Mosquitto
) -> None:
    """A pixel query refused as an older edge refuses it (invalid_header) finishes on the
    device; the next one to that edge sends block 0's float32 input."""
    edge = ScriptedEdge(mosq.url, "ea", mobilenet, refuse_pixels=True)
    dev = _device(mobilenet, mosq.url, "ea", split=0, deadline_ms=5000)
    try:
        assert dev.connect() is not None
        px = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        first = dev.query(px)
        assert not first.offloaded and first.reason == "edge error: invalid_header"
        prep = mobilenet.manifest.preprocessing
        assert prep is not None
        want = dev.tfl.run(0, 18, normalize_pixels(px, prep.mean, prep.std))
        assert np.array_equal(first.output, want)  # finished locally, from the pixels
        dev.loop.call(lambda: None)  # the refusal reached the session (posted before)
        second = dev.query(px)
        assert second.offloaded, second.reason
    finally:
        dev.close()
        edge.close()
    assert edge.dtypes == ["uint8", "float32"]


def test_a_local_query_teaches_the_plans_what_runs_around_its_blocks(
    mobilenet: ModelPackage, mosq: Mosquitto
) -> None:
    """The time a local query spends outside TFLite (normalising its pixels, Python) is part
    of what a local plan costs: the next plans predict it; a query that ran device blocks
    and offloaded the rest teaches none (its latency is not all the device's), nor does a
    local one whose interpreters were made on the way (the first)."""
    edge = ScriptedEdge(mosq.url, "ea", mobilenet)
    dev = _device(mobilenet, mosq.url, "ea", split=18, deadline_ms=5000)
    try:
        assert dev.connect() is not None
        assert dev.inputs.estimates.device_overhead == 0.0
        px = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        assert dev.tfl.num_loaded == 0
        first = dev.query(px)  # makes every interpreter: not a sample
        assert not first.offloaded and dev.tfl.num_loaded == 18
        dev.loop.call(lambda: None)  # its observations (posted before) are in
        assert dev.inputs.estimates.device_overhead == 0.0
        dev.query(px)
        dev.loop.call(lambda: None)
        est = dev.inputs.estimates
        assert 0.0 < est.device_overhead <= 1.0
        second = dev.query(px)
        assert second.predicted_ms == pytest.approx(5.0 * 18 * est.device_scale)
        assert second.predicted_ms > 5.0 * 18 * est.device_factor
        dev.loop.call(lambda: None)
        learned = dev.inputs.estimates.device_overhead
        mixed = dev.query(px, split=9)  # D[0,9) E[9,18): device blocks, then the edge
        assert mixed.offloaded and mixed.front_ms > 0
        dev.loop.call(lambda: None)
        assert dev.inputs.estimates.device_overhead == learned
    finally:
        dev.close()
        edge.close()
