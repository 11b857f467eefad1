"""From chunks to a stored block over a real mosquitto: a full disk answers store_failed, every
chunk is kept for a retry, and the edge keeps serving."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest

from edge_agent.loading import BlockLoader
from edge_agent.workers import Chain
from iotoffload.transport.frame import (
    ErrorCode,
    Hello,
    UploadAck,
    UploadChunk,
)
from tests.edge_agent.conftest import Harness, RawClient, TinyModel, full_disk, tiny_model

pytestmark = pytest.mark.integration

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def test_a_full_disk_answers_store_failed_and_the_edge_keeps_serving(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model()
    edge = harness.edge()
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    chunks = model.chunks(dev.device, 0)
    full_disk(monkeypatch, "partial")  # no chunk can be written
    dev.upload_chunk(*chunks[0])
    e = dev.error()
    assert (e.code, e.block, e.chunk, e.request_id) == (ErrorCode.STORE_FAILED, 0, 0, None)
    assert "No space left" in e.message
    dev.control(Hello(device=dev.device, model_id=model.model_id))
    assert dev.inventory().known  # still answering
    monkeypatch.undo()
    full_disk(monkeypatch, "blocks")  # the chunks fit, the assembled block does not
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
    dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(model, "q", X))
    np.testing.assert_allclose(dev.result("q"), model.expected(X, 0, 3))
    s = edge.stats
    assert s.error_codes == {"store_failed": 2} and s.blocks_stored == 3


def test_a_block_is_acked_loaded_only_once_every_worker_made_its_sessions(
    harness: Harness,
) -> None:
    """A device queries as soon as its last block is acked: were the ack sent before the
    workers' warm-up, that query would pay the session creation (and miss a short deadline)."""
    edge = harness.edge(workers=2)
    real_warm = edge.loader.warm
    gate = threading.Event()
    warmed: list[concurrent.futures.Future[None]] = []

    def gated(chain: Chain, indices: list[int]) -> concurrent.futures.Future[None]:
        done = real_warm(chain, indices)
        warmed.append(done)
        held: concurrent.futures.Future[None] = concurrent.futures.Future()

        def release() -> None:
            gate.wait(10)
            done.result(10)  # the real warm-up, both workers
            held.set_result(None)

        threading.Thread(target=release, daemon=True).start()
        return held

    edge.loader.warm = gated
    model = tiny_model(1)
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    for h, body in model.chunks(dev.device, 0):
        dev.upload_chunk(h, body)
    with pytest.raises(AssertionError, match="no such frame"):  # probed, the workers held
        dev.take(lambda h: isinstance(h, UploadAck) and h.block_done, timeout=1.0)
    assert len(warmed) == 1
    gate.set()
    ack, _ = dev.take(lambda h: isinstance(h, UploadAck) and h.block_done)
    assert isinstance(ack, UploadAck) and ack.loaded  # (sent once both workers said so)


def _announced_with_warm_ups_counted(
    harness: Harness,
) -> tuple[list[list[int]], RawClient, TinyModel, list[tuple[UploadChunk, bytes]]]:
    """An edge whose warm-ups are recorded (the real ones still run), a one-block model
    announced to it, and that block's chunks."""
    edge = harness.edge()
    real_warm = edge.loader.warm
    warms: list[list[int]] = []

    def counted(chain: Chain, indices: list[int]) -> concurrent.futures.Future[None]:
        warms.append(indices)
        return real_warm(chain, indices)

    edge.loader.warm = counted
    model = tiny_model(1)
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    return warms, dev, model, model.chunks(dev.device, 0)


def test_chunks_of_a_block_served_already_are_acked_without_probing_or_warming_again(
    harness: Harness,
) -> None:
    """After a reconnect a device may resend a whole block the edge has; each of those chunks
    once probed the block and warmed it in every worker again, ahead of queries (a broker
    restart made the next query wait 100+ ms behind 200 warm-ups)."""
    warms, dev, model, chunks = _announced_with_warm_ups_counted(harness)
    assert len(chunks) > 2
    for h, body in chunks:
        dev.upload_chunk(h, body)
    first, _ = dev.take(lambda h: isinstance(h, UploadAck) and h.block_done)
    assert isinstance(first, UploadAck) and first.loaded and warms == [[0]]
    for _ in range(2):  # the whole block resent, twice
        for h, body in chunks:
            dev.upload_chunk(h, body)
    for _ in range(2 * len(chunks)):  # every chunk still answered, from what is known
        ack, _ = dev.take(lambda h: isinstance(h, UploadAck) and h.block_done)
        assert isinstance(ack, UploadAck) and ack.loaded and ack.block_ms == first.block_ms
    assert warms == [[0]]
    dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(model, "q", X))
    np.testing.assert_allclose(dev.result("q"), model.expected(X, 0, 1))


def test_last_chunks_arriving_together_share_one_probe_and_one_warm_up(harness: Harness) -> None:
    warms, dev, _, chunks = _announced_with_warm_ups_counted(harness)
    for h, body in chunks:
        dev.upload_chunk(h, body)
    for h, body in chunks:  # resent at once: these arrive while the first probe runs
        dev.upload_chunk(h, body)
    for _ in range(1 + len(chunks)):
        ack, _ = dev.take(lambda h: isinstance(h, UploadAck) and h.block_done)
        assert isinstance(ack, UploadAck) and ack.loaded
    assert warms == [[0]]


def test_a_block_two_models_load_at_once_stays_protected_until_both_end() -> None:
    """Eviction skips blocks being loaded; a digest two models load at once was unprotected
    once the first load ended (a set of digests, cleared by the first)."""
    loader = object.__new__(BlockLoader)  # the bookkeeping alone, on this test's loop
    loader._loads, loader._loading, loader._serving = {}, frozenset(), {}
    loader._in_use = frozenset()
    gates = {"m1": asyncio.Event(), "m2": asyncio.Event()}

    async def serve_block(
        model_id: str, sha: str, ch: object, indices: list[int]
    ) -> tuple[bool, None]:
        await gates[model_id].wait()
        return True, None

    loader._serve_block = serve_block  # type: ignore[method-assign]

    async def run() -> None:
        ch = object()
        one = asyncio.ensure_future(loader._serve_once(("m1", "sha"), ch, [0]))  # type: ignore[arg-type]
        two = asyncio.ensure_future(loader._serve_once(("m2", "sha"), ch, [3]))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert "sha" in loader.in_use()
        gates["m1"].set()
        await one
        assert "sha" in loader.in_use()  # m2 still loads it
        gates["m2"].set()
        await two
        assert "sha" not in loader.in_use() and loader._loads == {}

    asyncio.run(run())
