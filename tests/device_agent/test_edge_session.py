"""The upload's flow control, with a fake link: a window of one round trip's bytes plus one
chunk, cumulative acks, chunks sized to the link, resumes in the edge's chunking."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from device_agent.agent import DEFAULT_CHUNK
from device_agent.edge_session import (
    ACK_SLACK_S,
    CHUNK_LINK_S,
    EDGE_MAX_CHUNKS,
    IDLE_CHUNK_LINK_S,
    MIN_CHUNK,
    QUERY_QUIET_S,
    EdgeSession,
)
from iotoffload.loop import AgentLoop
from iotoffload.model import ModelPackage
from iotoffload.planning import Estimates, PlanningInputs, chain_profile
from iotoffload.transport.frame import Inventory, UploadAck, UploadChunk, decode
from iotoffload.transport.link import Handler, Link
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.topics import Topics


class FakeLink:
    """A ``Link`` that records upload chunks instead of sending them."""

    def __init__(self) -> None:
        self.chunks: list[UploadChunk] = []
        self.published: list[str] = []  # every frame's type, in order
        self.on_reconnect: list[Callable[[], None]] = []

    def connect(self, timeout: float = 10.0) -> None:
        pass

    def wait_connected(self, timeout: float) -> bool:
        return True

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    connected = True

    def publish(self, _topic: str, payload: bytes, **_: Any) -> None:
        h, _ = decode(payload)
        self.published.append(h.type)
        if isinstance(h, UploadChunk):
            self.chunks.append(h)


def _session(
    pkg: ModelPackage, link: FakeLink, bandwidth: float = 200_000, chunk: int = 1024
) -> EdgeSession:
    prof = chain_profile(pkg, [1.0] * pkg.num_blocks)
    s = EdgeSession(
        "e1",
        "mqtt://127.0.0.1:1",
        link,
        pkg=pkg,
        device_id="d1",
        topics=Topics(),
        inputs=PlanningInputs(prof, Estimates(bandwidth_Bps=bandwidth, rtt_ms=5.0)),
        chunk_size=chunk,
    )
    s._raw = set(range(pkg.num_blocks))  # the tests send made-up bytes: as plain blocks
    return s


def _settle(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)


@pytest.fixture
def loop() -> Iterator[AgentLoop]:
    lp = AgentLoop("test-device")
    yield lp
    lp.close()


def _ack(loop: AgentLoop, s: EdgeSession, pkg: ModelPackage, c: int, block: int = 0) -> None:
    """The frame handler runs on the loop, as in the agent."""
    ack = UploadAck(
        model_id=pkg.manifest.model_id, block=block, chunk=c, block_done=False, loaded=False
    )
    loop.call(lambda: s.on_ack(ack))


def test_the_window_holds_one_round_trip_plus_one_chunk_and_queries_do_not_stop_it(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    link = FakeLink()
    s = _session(mobilenet, link)  # 200 kB/s, 5 ms RTT: 2000 B in flight + one 1024 B chunk
    assert s.window_bytes(1024) == 1024 + int(200_000 * (0.005 + ACK_SLACK_S))
    data = memoryview(bytes(10 * 1024))  # 10 chunks of block 0
    t = loop.spawn(s._send_block(0, data, None, None))  # on the loop, as in the agent
    _settle(lambda: len(link.chunks) == 2)
    time.sleep(0.2)
    assert len(link.chunks) == 2  # the window is full: nothing more without an ack
    assert s.unacked_bytes == 2048
    loop.call(s.query_started)  # a query to this edge is in flight: the upload goes on
    _ack(loop, s, mobilenet, 0)
    _settle(lambda: len(link.chunks) == 3)
    assert [c.chunk for c in link.chunks] == [0, 1, 2]
    _ack(loop, s, mobilenet, 2)  # acks count cumulatively: 1 and 2 are through
    _settle(lambda: len(link.chunks) == 5)
    assert loop.call(lambda: sorted(s._unacked)) == [(0, 3), (0, 4)]
    loop.call(s.query_done)
    acked = {0, 1, 2}
    end = time.monotonic() + 5
    while not t.done() and time.monotonic() < end:  # ack what was sent, as an edge would
        for c in [x.chunk for x in link.chunks if x.chunk not in acked]:
            _ack(loop, s, mobilenet, c)
            acked.add(c)
        time.sleep(0.01)
    assert t.result(1) and [c.chunk for c in link.chunks] == list(range(10))
    assert all(c.chunk_size == 1024 for c in link.chunks)


def test_chunk_acks_in_a_row_measure_the_link(mobilenet: ModelPackage) -> None:
    s = _session(mobilenet, FakeLink(), bandwidth=10e6)
    for _ in range(5):  # 1 KiB acked every ~10 ms: ~100 kB/s, far below the 10 MB/s assumed
        s._observe_chunk_ack(1024)
        time.sleep(0.01)
    assert s.inputs.estimates.bandwidth_Bps < 0.9 * 10e6


def _busy(s: EdgeSession) -> EdgeSession:
    s.query_started()  # a query offloaded just now: chunks for a link queries share
    return s


def test_chunks_are_sized_to_the_link_within_bounds(mobilenet: ModelPackage) -> None:
    assert (CHUNK_LINK_S, IDLE_CHUNK_LINK_S) == (0.08, 0.16)  # the figures below
    link = FakeLink()
    big = 1 << 20
    # at most CHUNK_LINK_S of link time, a power of two: 800 kB at 10 MB/s -> 512 KiB,
    # 80 kB at 1 MB/s -> 64 KiB; similar links agree
    assert _busy(_session(mobilenet, link, 10e6, big)).link_chunk() == 512 * 1024
    assert _busy(_session(mobilenet, link, 9.3e6, big)).link_chunk() == 512 * 1024
    assert _busy(_session(mobilenet, link, 7e6, big)).link_chunk() == 512 * 1024
    assert _busy(_session(mobilenet, link, 2.5e6, big)).link_chunk() == 128 * 1024  # 20 Mbit/s
    assert _busy(_session(mobilenet, link, 1e6, big)).link_chunk() == 64 * 1024
    assert _busy(_session(mobilenet, link, 14e6, big)).link_chunk() == 1024 * 1024
    assert _busy(_session(mobilenet, link, 1e3, big)).link_chunk() == MIN_CHUNK  # a slow link
    assert _busy(_session(mobilenet, link, 100e6, big)).link_chunk() == big  # capped
    assert _busy(_session(mobilenet, link, 1e3, 1024)).link_chunk() == 1024  # a smaller cap wins
    # no query offloaded lately, none announced: nothing waits behind a chunk, so twice the
    # link time (half the chunks, each ~1 ms of a slowed device's CPU)
    assert _session(mobilenet, link, 10e6, big).link_chunk() == 1024 * 1024
    assert _session(mobilenet, link, 2.5e6, big).link_chunk() == 256 * 1024
    assert _session(mobilenet, link, 10e6, DEFAULT_CHUNK).link_chunk() == DEFAULT_CHUNK
    quiet = _busy(_session(mobilenet, link, 10e6, big))
    quiet._last_query -= QUERY_QUIET_S + 1  # the last query long ago
    assert quiet.link_chunk() == 1024 * 1024
    quiet.expect_query(object(), time.perf_counter() + 1, time.perf_counter() + 2)
    assert quiet.link_chunk() == 512 * 1024  # a query announced: small chunks again


def test_a_resume_keeps_the_chunking_the_edge_holds_and_refuses_a_hostile_one(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    link = FakeLink()
    s = _session(mobilenet, link, bandwidth=10e6, chunk=64 * 1024)  # would send ~64 KiB chunks
    mid = mobilenet.manifest.model_id
    big = max(range(mobilenet.num_blocks), key=lambda i: mobilenet.blocks[i].onnx_bytes)
    other = 0 if big else 1
    size = mobilenet.blocks[big].onnx_bytes
    n = -(-size // (16 * 1024))
    assert n >= 3
    held = Inventory(
        model_id=mid,
        known=True,
        partial={big: [1, 2], other: [0]},
        partial_chunk_size={big: 16 * 1024, other: 7},  # 7-byte chunks are not ours
    )
    loop.call(lambda: s.on_inventory(held))
    assert loop.call(lambda: dict(s._partial)) == {big: [1, 2]}
    data = memoryview(bytes(size))
    t = loop.spawn(s._send_block(big, data, [1, 2], None))
    _settle(lambda: len(link.chunks) == 2)
    assert [(c.chunk, c.chunk_size, c.chunks) for c in link.chunks] == [
        (1, 16 * 1024, n),
        (2, 16 * 1024, n),
    ]
    assert t.result(5)


def test_an_expected_query_holds_the_chunks_that_would_still_be_on_the_link(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    link = FakeLink()
    s = _session(mobilenet, link)  # 200 kB/s: a 1 KiB chunk leaves in ~5 ms
    now = time.perf_counter()
    a, b = object(), object()
    assert s._hold_s(1024) == 0.0  # no query expected
    s.expect_query(a, now + 1.0, now + 2.0)
    assert s._hold_s(1024) == 0.0  # it leaves long before the tensor comes
    assert s._hold_s(400_000) > 1.0  # 2 s of link: it would still be there
    s.expect_query(b, now + 0.001, now + 5.0)  # a second query, sooner: the earliest counts
    assert s._hold_s(1024) > 1.0
    s.release(a)  # the first one's tensor went (or it ran locally): the second still holds
    assert s._hold_s(1024) > 1.0
    s.release(b)
    assert s._hold_s(1024) == 0.0
    s.expect_query(a, now - 1.0, now - 0.5)
    assert s._hold_s(400_000) == 0.0 and not s._holds  # the query is late: go on
    # on the loop: an imminent tensor holds the block's first chunk until it is published
    loop.call(lambda: s.expect_query(b, time.perf_counter(), time.perf_counter() + 30))
    t = loop.spawn(s._send_block(0, memoryview(bytes(1024)), None, None))
    time.sleep(0.2)
    assert link.chunks == []
    assert loop.call(lambda: s.query_started(b)) is True  # published: nothing was ahead
    _settle(lambda: len(link.chunks) == 1)
    assert t.result(5) and len(link.chunks) == 1


def test_two_uploads_waiting_on_one_session_are_both_woken(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    """(A fill task and the main upload may share a session after a move.) One ack opens the
    window for every waiter, not only the last to wait; a chunk sent twice counts once."""
    link = FakeLink()
    s = _session(mobilenet, link)  # a window of two 1 KiB chunks
    loop.call(lambda: s._unacked.update({(0, 0): 1024, (0, 1): 1024}))
    loop.call(lambda: setattr(s, "unacked_bytes", 2048))
    w1 = loop.spawn(s._wait_window(lambda: True, 1024, 1024, timeout=60))
    w2 = loop.spawn(s._wait_window(lambda: True, 1024, 1024, timeout=60))
    time.sleep(0.1)
    assert not w1.done() and not w2.done()
    _ack(loop, s, mobilenet, 1)  # cumulative: both through
    assert w1.result(0.5) and w2.result(0.5)  # well before the 1 s re-check timer
    assert loop.call(lambda: s.unacked_bytes) == 0
    t = loop.spawn(s._send_block(0, memoryview(bytes(1024)), [0], None))
    assert t.result(5)
    t = loop.spawn(s._send_block(0, memoryview(bytes(1024)), [0], None))  # the same chunk again
    assert t.result(5)
    assert loop.call(lambda: (s.unacked_bytes, sum(s._unacked.values()))) == (1024, 1024)


def test_a_probe_behind_upload_chunks_neither_resets_the_window_nor_samples_the_rtt(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    link = FakeLink()
    s = _session(mobilenet, link)
    mid = mobilenet.manifest.model_id
    loop.call(lambda: s._unacked.update({(0, 0): 1024, (0, 1): 1024}))
    loop.call(lambda: setattr(s, "unacked_bytes", 2048))
    rtt = s.inputs.estimates.rtt_ms
    for _ in range(5):  # the mobility monitor's probes, answered after a long queue
        loop.call(s.hello)
        time.sleep(0.02)
        loop.call(lambda: s.on_inventory(Inventory(model_id=mid, known=True)))
    assert s.inputs.estimates.rtt_ms == rtt
    assert loop.call(lambda: s.unacked_bytes) == 2048
    loop.call(lambda: s.hello(resync=True))  # a resync: the edge's state is the truth
    loop.call(lambda: s.on_inventory(Inventory(model_id=mid, known=True)))
    assert loop.call(lambda: s.unacked_bytes) == 0


def test_a_huge_block_is_cut_into_no_more_chunks_than_an_edge_takes(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    link = FakeLink()
    s = _session(mobilenet, link, bandwidth=1e3, chunk=1 << 20)  # would pick 16 KiB chunks
    size = 300 * 1024 * 1024
    s.observe(lambda e: dataclasses.replace(e, bandwidth_Bps=1e12))  # window: everything
    t = loop.spawn(s._send_block(0, memoryview(bytes(size)), [0], None))
    assert t.result(30)
    assert link.chunks[0].chunks <= EDGE_MAX_CHUNKS


def test_an_inventory_chunking_over_our_cap_or_unknown_means_upload_whole(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    s = _session(mobilenet, FakeLink(), chunk=64 * 1024)
    mid = mobilenet.manifest.model_id
    over = Inventory(model_id=mid, known=True, partial={0: [1]}, partial_chunk_size={0: 1 << 17})
    loop.call(lambda: s.on_inventory(over))  # over the broker cap our chunk_bytes is set for
    assert loop.call(lambda: dict(s._partial)) == {}
    unknown = Inventory(model_id=mid, known=True, partial={0: [1]})  # an older edge
    loop.call(lambda: s.on_inventory(unknown))
    assert loop.call(lambda: dict(s._partial)) == {}


def test_the_wait_behind_the_upload_is_what_exceeds_one_round_trip(
    mobilenet: ModelPackage,
) -> None:
    s = _session(mobilenet, FakeLink(), bandwidth=1e6)  # 1 MB/s, RTT 5 ms
    assert s.behind_upload_ms() is None  # nothing unacked: nothing ahead
    s.unacked_bytes = 30_000  # 30 ms of link, of which one round trip is past the queue
    assert s.behind_upload_ms() == pytest.approx(25.0)
    s.unacked_bytes = 2_000
    assert s.behind_upload_ms() == 0.0


def test_real_and_fake_links_implement_the_link_protocol() -> None:
    assert isinstance(FakeLink(), Link)
    real = MqttLink("mqtt://127.0.0.1:9", "never-connected")
    assert isinstance(real, Link)


def test_what_the_upload_cost_the_device_is_forgotten_when_it_ends(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    link = FakeLink()
    s = _session(mobilenet, link, bandwidth=1e9)
    mid = mobilenet.manifest.model_id
    assert s.inputs.estimates.device_factor == 1.0
    last = mobilenet.num_blocks - 1
    t = loop.spawn(s.upload([last]))
    _settle(lambda: len(link.chunks) > 0)
    # the upload slows the device: its block times run 2× their profile meanwhile
    loop.call(
        lambda: s.observe(lambda e: dataclasses.replace(e, device_factor=2.0, device_overhead=0.5))
    )
    n = link.chunks[0].chunks
    _settle(lambda: len(link.chunks) == n)
    done = UploadAck(model_id=mid, block=last, chunk=n - 1, block_done=True, loaded=True)
    loop.call(lambda: s.on_ack(done))
    assert t.result(10) is True
    assert s.inputs.estimates.device_factor == 1.0  # plans after the upload do not pay for it
    assert s.inputs.estimates.device_overhead == 0.0  # nor for its Python beside theirs


def test_a_chunk_lost_on_the_way_is_asked_for_and_resent_before_the_block_timeout(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    """QoS 0: a broker may drop a chunk (a full queue) while later ones arrive, and acks count
    cumulatively. The block's last chunk acked, then no block_done: the device asks."""
    link = FakeLink()
    s = _session(mobilenet, link, bandwidth=1e9, chunk=16 * 1024)
    mid = mobilenet.manifest.model_id
    big = max(range(mobilenet.num_blocks), key=lambda i: mobilenet.blocks[i].onnx_bytes)
    t = loop.spawn(s.upload([big], block_timeout=120))  # the timeout would be far too late
    _settle(lambda: bool(link.chunks) and len(link.chunks) == link.chunks[0].chunks)
    n = link.chunks[0].chunks
    assert n >= 3
    ack = UploadAck(model_id=mid, block=big, chunk=n - 1, block_done=False, loaded=False)
    loop.call(lambda: s.on_ack(ack))  # chunk 1 never reached the edge; the rest did
    hellos = len(link.published)
    _settle(lambda: len(link.published) > hellos, timeout=10)  # it asks (after LOST_CHUNK_S)
    held = Inventory(
        model_id=mid, known=True, partial={big: [1]}, partial_chunk_size={big: 16 * 1024}
    )
    loop.call(lambda: s.on_inventory(held))
    _settle(lambda: len(link.chunks) == n + 1)
    assert link.chunks[-1].chunk == 1  # resent: only what was lost
    done = UploadAck(model_id=mid, block=big, chunk=1, block_done=True, loaded=True)
    loop.call(lambda: s.on_ack(done))
    assert t.result(10) is True and not s.upload_errors
