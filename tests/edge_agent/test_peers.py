"""Edge-to-edge transfers over a real mosquitto: an unreachable or disallowed peer broker is
refused naming the source and never stalls the loop; a block moves between edges on two brokers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from iotoffload.transport.frame import (
    ErrorCode,
    Hello,
    PeerFetch,
    Transfer,
    UploadAck,
    UploadChunk,
    decode,
    encode,
)
from iotoffload.transport.link import Message
from tests.edge_agent.conftest import Harness, SilentBroker, tiny_model, wait_until

pytestmark = pytest.mark.integration

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def test_unreachable_peer_broker_does_not_delay_the_answer_to_a_hello(harness: Harness) -> None:
    model = tiny_model()
    with SilentBroker() as silent:
        edge = harness.edge(peer_brokers=[silent.url], peer_edges=["edge-old", "edge-new"])
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
        fetch = PeerFetch(peer="edge-new", device=dev.device, model_id=model.model_id, blocks=[2])
        dev.send(harness.topics.edge_control("edge1", "edge-new"), encode(fetch))
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
    edge = harness.edge(peer_edges=["edge-old"])
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


def test_a_block_moves_between_edges_on_two_brokers(harness: Harness, tmp_path: Path) -> None:
    """B pulls from A over A's broker (one peer link); A refuses a block rotten on its disk."""
    from tests.integration.conftest import Mosquitto

    model = tiny_model()
    (tmp_path / "b").mkdir()
    with Mosquitto(tmp_path / "b") as other:
        a = harness.edge("edge-a", peer_edges=["edge-b"])
        b = harness.edge("edge-b", url=other.url, peer_brokers=[harness.url], peer_edges=["*"])
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
        on_b.send(harness.topics.edge_query("edge-b", on_b.device), on_b.query_frame(model, "q", X))
        np.testing.assert_allclose(on_b.result("q"), model.expected(X, 0, 3))
        harness.close()  # before the second broker goes


# authorisation (protocol v2): the sender's identity is its topic's last level ------------------


def _fetch_as(harness: Harness, sender: str, fetch: PeerFetch, edge: str = "edge-a") -> None:
    """Publish ``fetch`` on ``edge``'s control topic as ``sender`` (what the broker's ACL lets
    only ``sender`` do on a secured broker)."""
    raw = harness.client(f"raw-{sender}", edge)
    raw.send(harness.topics.edge_control(edge, sender), encode(fetch))


def _pushes(harness: Harness, peer: str) -> list[tuple[int, int]]:
    """(block, chunk) of every chunk pushed to ``peer``'s upload topic from now on (the
    subscription is in place when this returns: a marker went through it)."""
    got: list[tuple[int, int]] = []
    marker = threading.Event()

    def on(m: Message) -> None:
        if m.payload == b"marker":
            marker.set()
            return
        h, _ = decode(m.payload)
        assert isinstance(h, UploadChunk)
        got.append((h.block, h.chunk))

    spy = harness.client(f"spy-{peer}")
    spy.link.subscribe(harness.topics.edge_upload(peer, "+"), on)
    deadline = time.monotonic() + 5
    while not marker.is_set():
        assert time.monotonic() < deadline, "the spy's subscription never took"
        spy.send(harness.topics.edge_upload(peer, "spy"), b"marker")
        marker.wait(0.2)
    return got


def test_a_fetch_from_an_edge_not_in_the_allow_list_pushes_nothing(harness: Harness) -> None:
    model = tiny_model()
    a = harness.edge("edge-a", peer_edges=["edge-b"])
    dev = harness.client("dev1", "edge-a")
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    stolen = _pushes(harness, "mallory")
    fetch = PeerFetch(peer="mallory", device="dev1", model_id=model.model_id, blocks=[0, 1, 2])
    _fetch_as(harness, "mallory", fetch)
    wait_until(lambda: a.peers.refused_fetches == 1, 5, "the refusal counted")
    time.sleep(0.3)
    assert stolen == [] and a.peers.blocks_pushed == 0
    with pytest.raises(AssertionError):  # a stranger's fetch: dev1 did not ask, is not told
        dev.error(timeout=0.3)


def test_a_peer_fetch_for_a_model_not_announced_tells_the_device(harness: Harness) -> None:
    """A real peer asks for a model dev1 never announced to edge-a: refused, and dev1 hears
    why (so a real handoff falls back to its own upload at once)."""
    model = tiny_model()
    a = harness.edge("edge-a", peer_edges=["edge-b"])
    dev = harness.client("dev1", "edge-a")
    fetch = PeerFetch(peer="edge-b", device="dev1", model_id=model.model_id, blocks=[0])
    _fetch_as(harness, "edge-b", fetch)
    e = dev.error(lambda e: e.code == ErrorCode.TRANSFER_REFUSED)
    assert e.peer == "edge-b" and "did not announce" in e.message
    assert a.peers.refused_fetches == 1


def test_a_fetch_naming_another_peer_than_its_sender_is_refused_silently(
    harness: Harness,
) -> None:
    """mallory asks edge-a to push to edge-b's topic (which mallory cannot read) in the name of
    edge-b: refused, and nobody is told (the device named did not ask)."""
    model = tiny_model()
    a = harness.edge("edge-a", peer_edges=["edge-b"])
    dev = harness.client("dev1", "edge-a")
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    pushed = _pushes(harness, "edge-b")
    fetch = PeerFetch(peer="edge-b", device="dev1", model_id=model.model_id, blocks=[0])
    _fetch_as(harness, "mallory", fetch)
    wait_until(lambda: a.peers.refused_fetches == 1, 5, "the refusal counted")
    time.sleep(0.3)
    assert pushed == [] and a.peers.blocks_pushed == 0
    with pytest.raises(AssertionError):
        dev.error(timeout=0.5)


def test_a_fetch_for_a_model_its_device_did_not_announce_here_is_refused(
    harness: Harness,
) -> None:
    model = tiny_model()
    a = harness.edge("edge-a", peer_edges=["edge-b"])
    dev = harness.client("dev1", "edge-a")
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    pushed = _pushes(harness, "edge-b")
    # a real peer, but the device it names never announced this model to edge-a
    fetch = PeerFetch(peer="edge-b", device="dev2", model_id=model.model_id, blocks=[0])
    _fetch_as(harness, "edge-b", fetch)
    wait_until(lambda: a.peers.refused_fetches == 1, 5, "the refusal counted")
    time.sleep(0.3)
    assert pushed == []
    assert a.store.announced_by(model.model_id, "dev1")
    assert not a.store.announced_by(model.model_id, "dev2")


def test_a_block_listed_many_times_is_pushed_once(harness: Harness) -> None:
    model = tiny_model()
    a = harness.edge("edge-a", peer_edges=["edge-b"], transfer_chunk_bytes=1024)
    dev = harness.client("dev1", "edge-a")
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    pushed = _pushes(harness, "edge-b")
    fetch = PeerFetch(peer="edge-b", device="dev1", model_id=model.model_id, blocks=[1] * 150)
    _fetch_as(harness, "edge-b", fetch)
    wait_until(lambda: a.peers.blocks_pushed == 1, 5, "one block pushed")
    time.sleep(0.3)
    assert a.peers.blocks_pushed == 1
    assert sorted(pushed) == sorted(set(pushed)) and {b for b, _ in pushed} == {1}


def test_a_push_nobody_asked_for_is_refused_and_not_stored(harness: Harness) -> None:
    """Chunks on edge-b's upload topic claiming to come from a peer (source set) that edge-b
    never asked: refused as forbidden, nothing stored."""
    model = tiny_model()
    b = harness.edge("edge-b", peer_edges=["*"])
    dev = harness.client("dev1", "edge-b")
    dev.control(model.announce(dev.device))
    dev.inventory()
    evil = harness.client("edge-a", "edge-b")
    for h, body in model.chunks("dev1", 0):
        evil.send(
            harness.topics.edge_upload("edge-b", "edge-a"),
            encode(h.model_copy(update={"source": "edge-a"}), body),
        )
    wait_until(lambda: b.stats.error_codes.get("forbidden", 0) >= 1, 5, "refused")
    assert b.stats.blocks_stored == 0 and b.inventory(model.model_id).stored == []
