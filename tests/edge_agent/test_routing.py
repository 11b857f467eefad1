"""Inbound messages over a real mosquitto: every refusal is a typed error frame naming the
block and chunk, and a Hello right after an Announce sees the model."""

from __future__ import annotations

import numpy as np
import pytest

from iotoffload.transport.frame import (
    ErrorCode,
    Hello,
    encode,
)
from tests.edge_agent.conftest import Harness, tiny_model

pytestmark = pytest.mark.integration

X = np.arange(4, dtype=np.float32).reshape(1, 4)


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
        harness.topics.edge_upload("edge1", dev.device),
        encode(Hello(device=dev.device, model_id=model.model_id)),
    )
    e = dev.error()
    assert (e.code, e.block, e.chunk) == (ErrorCode.UNEXPECTED, None, None)
    on_control = dev.query_frame(model, "on-control", X)
    dev.send(harness.topics.edge_control("edge1", dev.device), on_control)
    e = dev.error()
    assert (e.code, e.request_id, e.block) == (ErrorCode.UNEXPECTED, None, None)
    inv = edge.inventory(model.model_id)
    assert inv.stored == [] and 0 not in inv.partial  # the rotten upload was dropped
    dev.upload(model)  # and the edge keeps serving
    dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(model, "ok", X))
    np.testing.assert_allclose(dev.result("ok"), model.expected(X, 0, 3))
    assert edge.stats.error_codes == {"size_mismatch": 1, "digest_mismatch": 1, "unexpected": 2}


def test_a_hello_right_after_an_announce_sees_the_model(harness: Harness) -> None:
    model = tiny_model()
    harness.edge()
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.control(Hello(device=dev.device, model_id=model.model_id))  # not waiting in between
    assert dev.inventory().known and dev.inventory().known
