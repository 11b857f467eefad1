"""The edge over a real mosquitto: one loop owns its state, handlers never block, and every
refusal is a typed error frame."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import edge_agent.store
from iotoffload.transport.frame import (
    ErrorCode,
    Hello,
    PeerFetch,
    Query,
    Transfer,
    UploadAck,
    encode,
    encode_tensor_frame,
)
from iotoffload.transport.mqtt import Message
from iotoffload.transport.status import EdgeStatus
from tests.edge_agent.conftest import Harness, SilentBroker, tiny_model, wait_until

pytestmark = pytest.mark.integration

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def test_unreachable_peer_broker_does_not_delay_the_answer_to_a_hello(harness: Harness) -> None:
    model = tiny_model()
    with SilentBroker() as silent:
        edge = harness.edge(peer_brokers=[silent.url])
        dev = harness.client()
        dev.control(model.announce(dev.device))
        assert dev.inventory().known
        transfer = Transfer(
            device=dev.device,
            model_id=model.model_id,
            source_edge="edge-old",
            source_broker=silent.url,
            blocks=[0, 1],
        )
        dev.control(transfer)
        dev.control(transfer)  # a second transfer naming the same broker: no second connect
        assert silent.connected.wait(5), "the edge never tried the peer broker"
        # another edge asks this one for a block meanwhile (the push path took the lock the
        # pending connect held: every MQTT handler stalled behind it)
        dev.control(
            PeerFetch(peer="edge-new", device=dev.device, model_id=model.model_id, blocks=[2])
        )
        for _ in range(5):
            t0 = time.perf_counter()
            dev.control(Hello(device=dev.device, model_id=model.model_id))
            inv = dev.inventory(timeout=2)
            took = time.perf_counter() - t0
            assert inv.known and took < 0.2, f"hello answered after {took:.3f} s"
        pushed = dev.error(lambda e: e.peer == "edge-new")
        assert (pushed.code, pushed.block, pushed.request_id) == (
            ErrorCode.TRANSFER_FAILED,
            2,
            None,
        )
        assert pushed.edge == "edge1"
        # both transfers fail once the connect times out, naming the source edge
        for _ in range(2):
            e = dev.error(lambda e: e.peer == "edge-old", timeout=15)
            assert e.code == ErrorCode.TRANSFER_FAILED
            assert (e.block, e.chunk, e.request_id, e.edge) == (None, None, None, "edge1")
        assert silent.accepted == 1
        assert edge.stats.error_codes == {"transfer_failed": 3}
        harness.close()  # before the silent broker goes


def test_a_transfer_from_a_broker_not_allowed_is_refused_naming_the_source(
    harness: Harness,
) -> None:
    model = tiny_model()
    edge = harness.edge()
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.control(
        Transfer(
            device=dev.device,
            model_id=model.model_id,
            source_edge="edge-old",
            source_broker="mqtt://127.0.0.1:1",
            blocks=[0],
        )
    )
    e = dev.error()
    assert (e.code, e.peer, e.block, e.request_id) == (
        ErrorCode.TRANSFER_REFUSED,
        "edge-old",
        None,
        None,
    )
    assert edge.stats.error_codes == {"transfer_refused": 1}


def test_concurrent_queries_from_several_clients_are_all_counted(harness: Harness) -> None:
    model = tiny_model()
    edge = harness.edge(workers=3)
    devs = [harness.client(f"dev{k}") for k in range(4)]
    devs[0].control(model.announce(devs[0].device))
    devs[0].inventory()
    devs[0].upload(model)
    per_client = 30
    failures: list[BaseException] = []

    def run(k: int) -> None:
        dev = devs[k]
        try:
            xs = [X + k * 100 + j for j in range(per_client)]
            for j, x in enumerate(xs):  # all sent at once: they queue on the edge
                dev.send(
                    harness.topics.edge_query("edge1"),
                    dev.query_frame(model, f"q{k}-{j}", x.astype(np.float32)),
                )
            for j, x in enumerate(xs):
                np.testing.assert_allclose(
                    dev.result(f"q{k}-{j}"), model.expected(x, 0, 3), rtol=0, atol=1e-5
                )
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(devs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    s = edge.stats  # every result was counted before it was sent
    assert s.queries == per_client * len(devs)
    assert s.in_flight == 0 and s.errors == 0
    assert edge.load_factor() == 0
    assert s.exec_ms_ewma > 0
    inv = edge.inventory(model.model_id)
    assert inv.stored == inv.loaded == [0, 1, 2] and set(inv.block_ms) == {0, 1, 2}


def test_stats_hammered_from_many_threads_lose_nothing(harness: Harness) -> None:
    """Messages handed to the edge's handlers from 8 threads at once, as paho threads would:
    queries and refusals counted on the loop, none lost."""
    model = tiny_model(2)
    edge = harness.edge(workers=4)
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    topic = harness.topics.edge_query("edge1")
    good, bad, n_threads = 150, 25, 8
    unknown = "0" * 64
    go = threading.Barrier(n_threads)

    def hammer(k: int) -> None:
        go.wait()
        for j in range(good):
            frame = dev.query_frame(model, f"h{k}-{j}", X)
            edge._on_query_message(Message(topic, frame))
        for j in range(bad):
            frame = encode_tensor_frame(
                Query,
                X,
                request_id=f"b{k}-{j}",
                device="nobody",
                model_id=unknown,
                start=0,
                end=1,
                deadline_ms=60_000,
            )
            edge._on_query_message(Message(topic, frame))

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    total = n_threads * (good + bad)
    wait_until(lambda: (s := edge.stats).queries + s.errors == total, 60, "every query answered")
    s = edge.stats
    assert s.queries == n_threads * good
    assert s.error_codes == {"unknown_model": n_threads * bad}
    assert s.in_flight == 0 and edge.load_factor() == 0


def test_upload_errors_name_the_block_and_chunk(harness: Harness) -> None:
    model = tiny_model()
    edge = harness.edge()
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    h, body = model.chunks(dev.device, 1)[2]
    dev.upload_chunk(h, body[:-1])  # one byte short
    e = dev.error()
    assert (e.code, e.block, e.chunk, e.request_id, e.edge) == (
        ErrorCode.SIZE_MISMATCH,
        1,
        2,
        None,
        "edge1",
    )
    # every chunk of a block whose bytes are not what its digest says
    for h, body in model.chunks(dev.device, 0):
        dev.upload_chunk(h.model_copy(update={"block_sha256": "ab" * 32}), body)
    last = h.chunk
    e = dev.error()
    assert (e.code, e.block, e.chunk, e.request_id) == (ErrorCode.DIGEST_MISMATCH, 0, last, None)
    # a frame of the wrong type on a topic
    dev.send(
        harness.topics.edge_upload("edge1"),
        encode(Hello(device=dev.device, model_id=model.model_id)),
    )
    e = dev.error()
    assert (e.code, e.block, e.chunk) == (ErrorCode.UNEXPECTED, None, None)
    dev.send(harness.topics.edge_control("edge1"), dev.query_frame(model, "on-control", X))
    e = dev.error()
    assert (e.code, e.request_id, e.block) == (ErrorCode.UNEXPECTED, None, None)
    inv = edge.inventory(model.model_id)
    assert inv.stored == [] and 0 not in inv.partial  # the rotten upload was dropped
    dev.upload(model)  # and the edge keeps serving
    dev.send(harness.topics.edge_query("edge1"), dev.query_frame(model, "ok", X))
    np.testing.assert_allclose(dev.result("ok"), model.expected(X, 0, 3))
    assert edge.stats.error_codes == {"size_mismatch": 1, "digest_mismatch": 1, "unexpected": 2}


def _disk_full_for(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    real = edge_agent.store._atomic_write

    def full(path: Path, data: bytes) -> None:
        if where in path.parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(edge_agent.store, "_atomic_write", full)


def test_a_full_disk_answers_store_failed_and_the_edge_keeps_serving(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model()
    edge = harness.edge()
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    chunks = model.chunks(dev.device, 0)
    _disk_full_for(monkeypatch, "partial")  # no chunk can be written
    dev.upload_chunk(*chunks[0])
    e = dev.error()
    assert (e.code, e.block, e.chunk, e.request_id) == (ErrorCode.STORE_FAILED, 0, 0, None)
    assert "No space left" in e.message
    dev.control(Hello(device=dev.device, model_id=model.model_id))
    assert dev.inventory().known  # still answering
    monkeypatch.undo()
    _disk_full_for(monkeypatch, "blocks")  # the chunks fit, the assembled block does not
    for h, body in chunks:
        dev.upload_chunk(h, body)
    e = dev.error()
    assert (e.code, e.block, e.chunk) == (ErrorCode.STORE_FAILED, 0, chunks[-1][0].chunk)
    inv = edge.inventory(model.model_id)
    assert inv.stored == [] and inv.partial[0] == []  # every chunk kept for a retry
    monkeypatch.undo()
    dev.upload_chunk(*chunks[-1])  # the retry of the last chunk completes the block
    ack, _ = dev.take(lambda h: isinstance(h, UploadAck) and h.block_done)
    assert isinstance(ack, UploadAck) and ack.loaded
    dev.upload(model)
    dev.send(harness.topics.edge_query("edge1"), dev.query_frame(model, "q", X))
    np.testing.assert_allclose(dev.result("q"), model.expected(X, 0, 3))
    s = edge.stats
    assert s.error_codes == {"store_failed": 2} and s.blocks_stored == 3


def test_status_is_an_edge_status(harness: Harness) -> None:
    model = tiny_model()
    edge = harness.edge()
    dev = harness.client()
    got: list[EdgeStatus] = []
    seen = threading.Event()

    def on_status(m: Message) -> None:
        st = EdgeStatus.parse(m.payload)
        assert st is not None
        got.append(st)
        if st.state == "online" and st.blocks == 3:
            seen.set()

    dev.link.subscribe(harness.topics.edge_status("edge1"), on_status)
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    assert seen.wait(5)
    st = got[-1]
    assert st.edge == "edge1" and st.models == [model.model_id] and st.broker == edge.broker_url
    assert st.load.in_flight == 0 and st.transfer.blocks_pushed == 0
    edge.stop()
    wait_until(lambda: got[-1].state == "offline", 5, "the offline status")


def test_a_block_moves_between_edges_on_two_brokers(harness: Harness, tmp_path: Path) -> None:
    """B pulls from A over A's broker (one peer link); A refuses a block rotten on its disk."""
    from tests.integration.conftest import Mosquitto

    model = tiny_model()
    (tmp_path / "b").mkdir()
    with Mosquitto(tmp_path / "b") as other:
        a = harness.edge("edge-a")
        b = harness.edge("edge-b", url=other.url, peer_brokers=[harness.url])
        on_a = harness.client("dev1", "edge-a")
        on_b = harness.client("dev1", "edge-b", url=other.url)
        for c in (on_a, on_b):
            c.control(model.announce(c.device))
            c.inventory()
        on_a.upload(model)
        rotten = a.store.block_path(model.digests[1])
        rotten.write_bytes(rotten.read_bytes()[:-1] + b"\0")
        on_b.control(
            Transfer(
                device="dev1",
                model_id=model.model_id,
                source_edge="edge-a",
                source_broker=harness.url,
                blocks=[0, 1, 2],
            )
        )
        for i in (0, 2):
            ack, _ = on_b.take(
                lambda h, i=i: isinstance(h, UploadAck) and h.block == i and h.block_done
            )
            assert isinstance(ack, UploadAck) and ack.loaded and ack.edge == "edge-b"
        e = on_a.error()
        assert (e.code, e.peer, e.block, e.edge) == (
            ErrorCode.TRANSFER_FAILED,
            "edge-b",
            1,
            "edge-a",
        )
        wait_until(lambda: a.peers.blocks_pushed == 2, 5, "A's count of pushed blocks")
        assert a.peers.refused_digest == 1
        assert b.stats.blocks_from_peers == 2 and b.stats.blocks_stored == 2
        assert b.inventory(model.model_id).stored == [0, 2]
        # the device sends the rotten one itself; the next transfer reuses B's peer link
        for h, body in model.chunks("dev1", 1):
            on_b.upload_chunk(h, body)
        on_b.take(lambda h: isinstance(h, UploadAck) and h.block == 1 and h.block_done)
        on_b.send(harness.topics.edge_query("edge-b"), on_b.query_frame(model, "q", X))
        np.testing.assert_allclose(on_b.result("q"), model.expected(X, 0, 3))
        harness.close()  # before the second broker goes


def test_a_hello_right_after_an_announce_sees_the_model(harness: Harness) -> None:
    model = tiny_model()
    harness.edge()
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.control(Hello(device=dev.device, model_id=model.model_id))  # not waiting in between
    assert dev.inventory().known and dev.inventory().known


def test_stop_joins_every_thread_even_unstarted(tmp_path: Path) -> None:
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeConfig

    before = set(threading.enumerate())
    e = EdgeAgent(EdgeConfig(id="e", broker="mqtt://127.0.0.1:1", store=tmp_path, advertise=False))
    with pytest.raises(ConnectionError):
        e.start()  # nobody listens there
    e.stop()
    assert [t.name for t in threading.enumerate() if t not in before] == []
    assert e.stats.queries == 0
