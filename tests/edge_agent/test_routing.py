"""Inbound messages over a real mosquitto: every refusal is a typed error frame naming the
block and chunk, and a Hello right after an Announce sees the model."""

from __future__ import annotations

import numpy as np
import pytest

from iotoffload.model.manifest import compute_model_id
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
    # a chunk naming a digest the announced chain does not have: refused at once
    h, body = model.chunks(dev.device, 0)[0]
    dev.upload_chunk(h.model_copy(update={"block_sha256": "ab" * 32}), body)
    e = dev.error()
    assert (e.code, e.block, e.chunk) == (ErrorCode.INVALID_CHUNK, 0, 0)
    # every chunk of a block whose bytes are not what its (announced) digest says
    a = model.announce(dev.device)
    blocks = [a.blocks[0].model_copy(update={"onnx_sha256": "ab" * 32}), *a.blocks[1:]]
    rotten = a.model_copy(
        update={"blocks": blocks, "model_id": compute_model_id([b.onnx_sha256 for b in blocks])}
    )
    dev.control(rotten)
    dev.inventory()
    for h, body in model.chunks(dev.device, 0):
        dev.upload_chunk(
            h.model_copy(update={"block_sha256": "ab" * 32, "model_id": rotten.model_id}), body
        )
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
    assert edge.stats.error_codes == {
        "size_mismatch": 1,
        "invalid_chunk": 1,
        "digest_mismatch": 1,
        "unexpected": 2,
    }


def test_a_hello_right_after_an_announce_sees_the_model(harness: Harness) -> None:
    model = tiny_model()
    harness.edge()
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.control(Hello(device=dev.device, model_id=model.model_id))  # not waiting in between
    assert dev.inventory().known and dev.inventory().known


def test_frames_claiming_another_device_are_refused_to_their_sender(harness: Harness) -> None:
    """mallory sends, on its own topics (the only ones the broker lets it use), frames that
    name dev1: an announce, a hello, a chunk and a query. Each is refused as forbidden, the
    refusal goes to mallory, dev1 hears nothing, and nothing is stored, run or announced."""
    model = tiny_model()
    edge = harness.edge()
    victim = harness.client("dev1")
    mallory = harness.client("mallory")
    t = harness.topics
    mallory.send(t.edge_control("edge1", "mallory"), encode(model.announce("dev1")))
    e = mallory.error()
    assert e.code == ErrorCode.FORBIDDEN and "dev1" in e.message
    assert edge.store.model(model.model_id) is None
    mallory.send(
        t.edge_control("edge1", "mallory"),
        encode(Hello(device="dev1", model_id=model.model_id)),
    )
    assert mallory.error().code == ErrorCode.FORBIDDEN
    victim.control(model.announce("dev1"))
    victim.inventory()
    h, body = model.chunks("dev1", 0)[0]
    mallory.send(t.edge_upload("edge1", "mallory"), encode(h, body))
    assert mallory.error().code == ErrorCode.FORBIDDEN
    victim.upload(model)
    mallory.send(t.edge_query("edge1", "mallory"), victim.query_frame(model, "steal", X))
    e = mallory.error()
    assert (e.code, e.request_id) == (ErrorCode.FORBIDDEN, "steal")
    s = edge.stats
    assert s.error_codes == {"forbidden": 4} and s.queries == 0
    victim.send(t.edge_query("edge1", "dev1"), victim.query_frame(model, "mine", X))
    np.testing.assert_allclose(victim.result("mine"), model.expected(X, 0, 3))
    with pytest.raises(AssertionError):  # nothing else reached dev1
        victim.error(timeout=0.3)
    # the announce dev1 made is recorded as dev1's, mallory's forgery is not
    assert edge.store.announced_by(model.model_id, "dev1")
    assert not edge.store.announced_by(model.model_id, "mallory")


def test_a_message_on_a_topic_without_a_sender_level_is_ignored(harness: Harness) -> None:
    edge = harness.edge()
    dev = harness.client()
    dev.send("iotoffload/v2/edges/edge1/query", b"junk")  # the v1 topic: nobody to answer
    dev.send(harness.topics.edge_query("edge1", "dev1"), b"junk")  # answered: malformed
    assert dev.error().code == ErrorCode.MALFORMED
    assert edge.stats.error_codes == {"malformed": 1}
