"""From chunks to a stored block over a real mosquitto: a full disk answers store_failed, every
chunk is kept for a retry, and the edge keeps serving."""

from __future__ import annotations

import numpy as np
import pytest

from iotoffload.transport.frame import (
    ErrorCode,
    Hello,
    UploadAck,
)
from tests.edge_agent.conftest import Harness, full_disk, tiny_model

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
