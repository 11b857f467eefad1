"""Device and edge agents over a real broker: upload, offloaded queries, errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model import ModelPackage
from iotoffload.model.manifest import TensorSpec, compute_model_id
from iotoffload.model.preprocess import normalize_pixels
from iotoffload.runtime import TFLiteExecutor
from iotoffload.transport.frame import (
    MAGIC,
    Announce,
    BlockInfo,
    Error,
    FrameError,
    Inventory,
    Query,
    UploadChunk,
    decode,
    encode,
    encode_tensor_frame,
)
from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.topics import Topics
from tests.integration.conftest import BrokerUnderTest

pytestmark = pytest.mark.integration


def _edge(broker: BrokerUnderTest, store: Path) -> EdgeAgent:
    a = EdgeAgent(
        EdgeConfig(
            id="edge1", broker=broker.url, store=store, advertise=False, protocol=broker.protocol
        ),
        broker.security("edge1"),
    )
    a.start()
    return a


@pytest.fixture
def edge(broker: BrokerUnderTest, tmp_path: Path) -> Iterator[EdgeAgent]:
    a = _edge(broker, tmp_path / "store")
    yield a
    a.stop()


def _device(
    pkg: ModelPackage, broker: BrokerUnderTest, who: str = "dev1", **kw: object
) -> DeviceAgent:
    """Device ``who`` (its own identity on the secured deployment)."""
    d = DeviceAgent(
        pkg,
        broker.url,
        "edge1",
        protocol=broker.protocol,
        deadline_ms=5000,
        device_id=who,
        security=broker.security(who),
        **kw,  # type: ignore[arg-type]
    )
    inv = d.connect()
    assert inv is not None and inv.known
    return d


def test_offloaded_results_equal_local_at_several_splits(
    mobilenet: ModelPackage, edge: EdgeAgent, broker: BrokerUnderTest
) -> None:
    dev = _device(mobilenet, broker, split=0)
    try:
        dev.upload()
        assert not dev.upload_errors
        assert dev.inventory.stored == list(range(18))
        local = TFLiteExecutor.from_package(mobilenet)
        rng = np.random.default_rng(0)
        for k in (0, 5, 9, 17):
            x = rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
            out = dev.query(x, split=k)
            assert out.offloaded, out.reason
            assert out.edge_exec_ms is not None and out.edge_queue_ms is not None
            want = local.run(0, 18, x)
            np.testing.assert_allclose(out.output, want, rtol=0, atol=1e-4 * float(want.max()))
    finally:
        dev.close()


def test_second_device_uploads_nothing_and_store_survives_restart(
    mobilenet: ModelPackage, edge: EdgeAgent, broker: BrokerUnderTest, tmp_path: Path
) -> None:
    d1 = _device(mobilenet, broker, "dev1", split=9)
    d1.upload()
    # the encoded upload files travel, the edge stores the decoded blocks
    assert d1.bytes_uploaded == sum(b.upload_bytes for b in mobilenet.blocks)
    assert d1.bytes_uploaded < 0.9 * sum(b.onnx_bytes for b in mobilenet.blocks)
    for b in mobilenet.blocks:
        stored = edge.store.block_path(b.onnx_sha256).read_bytes()
        assert stored == mobilenet.onnx_path(b.index).read_bytes()
    d1.close()
    d2 = _device(mobilenet, broker, "dev2", split=9)
    d2.upload()
    assert d2.bytes_uploaded == 0
    d2.close()
    edge.stop()
    again = _edge(broker, tmp_path / "store")
    try:
        d3 = _device(mobilenet, broker, "dev3", split=9)
        assert d3.inventory.stored == list(range(18))
        out = d3.query(np.zeros((1, 224, 224, 3), np.float32))
        assert out.offloaded
        d3.close()
    finally:
        again.stop()


def test_queries_before_upload_run_locally(
    mobilenet: ModelPackage, edge: EdgeAgent, broker: BrokerUnderTest
) -> None:
    dev = _device(mobilenet, broker, split=9)
    try:
        out = dev.query(np.zeros((1, 224, 224, 3), np.float32))
        assert not out.offloaded and out.reason == "blocks not uploaded yet"
        assert out.output.shape == (1, 1000)
    finally:
        dev.close()


class Stranger:
    """Client ``spy`` (a device of its own on the secured deployment): sends what it likes to
    the edge as itself and collects the error frames the edge answers to its inbox."""

    def __init__(self, broker: BrokerUnderTest, who: str = "spy") -> None:
        self.who = who
        self.errors: list[Error] = []
        self.inventories: list[Inventory] = []
        self.link = MqttLink(
            broker.url, who, protocol=broker.protocol, security=broker.security(who)
        )
        self.link.subscribe(Topics().device_inbox(who, "+"), self._on)
        self.link.connect()

    def _on(self, m: Message) -> None:
        with contextlib.suppress(FrameError):
            h, _ = decode(m.payload)
            if isinstance(h, Error):
                self.errors.append(h)
            elif isinstance(h, Inventory):
                self.inventories.append(h)

    def announce_block(self, topics: Topics, edge: str, sha: str, nbytes: int) -> str:
        """Announce a one-block model of its own (chunks are taken only for a block of a
        model their device announced); its model id, once the edge answered."""
        t = TensorSpec(name="x", shape=(1, 4))
        info = BlockInfo(onnx_sha256=sha, onnx_bytes=nbytes, input=t, output=t)
        a = Announce(device=self.who, model_id=compute_model_id([sha]), blocks=[info])
        seen = len(self.inventories)
        self.link.publish(topics.edge_control(edge, self.who), encode(a))
        end = time.monotonic() + 10
        while len(self.inventories) == seen and time.monotonic() < end:
            time.sleep(0.01)
        assert len(self.inventories) > seen, "the edge did not answer the announce"
        return a.model_id

    def wait_codes(self, codes: list[str], timeout: float = 10.0) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end and sorted(e.code for e in self.errors) != sorted(codes):
            time.sleep(0.05)
        return sorted(e.code for e in self.errors)


def test_bad_input_gets_error_frames_and_the_edge_keeps_serving(
    mobilenet: ModelPackage, edge: EdgeAgent, broker: BrokerUnderTest
) -> None:
    """A stranger's bad frames (as itself: on the secured deployment it can be no one else)
    are answered to the stranger with typed errors; the device's service goes on."""
    dev = _device(mobilenet, broker, split=17)
    spy = Stranger(broker)
    try:
        dev.upload()
        t, link, mid, me = edge.topics, spy.link, mobilenet.manifest.model_id, spy.who
        q = t.edge_query("edge1", me)
        link.publish(q, b"garbage")  # answered to the topic's sender: malformed
        # an unknown frame version still names its sender: answered
        hdr = json.dumps({"type": "query", "request_id": "v9", "device": me}).encode()
        link.publish(q, MAGIC + struct.pack(">BI", 9, len(hdr)) + hdr)
        x = np.zeros((1, 7, 7, 320), np.float32)
        for start, end, model in ((17, 19, mid), (17, 18, "0" * 64)):
            link.publish(
                q,
                encode_tensor_frame(
                    Query,
                    x,
                    request_id=f"bad-{start}-{end}",
                    device=me,
                    model_id=model,
                    start=start,
                    end=end,
                    deadline_ms=100,
                ),
            )
        # a tensor of the wrong shape for block 17
        link.publish(
            q,
            encode_tensor_frame(
                Query,
                np.zeros((1, 7, 7, 3), np.float32),
                request_id="shape",
                device=me,
                model_id=mid,
                start=17,
                end=18,
                deadline_ms=100,
            ),
        )
        # an upload whose bytes do not match the announced digest
        up = t.edge_upload("edge1", me)
        chunk = UploadChunk(
            device=me,
            model_id=spy.announce_block(t, "edge1", "ab" * 32, 4),
            block=0,
            block_sha256="ab" * 32,
            block_bytes=4,
            chunk=0,
            chunks=1,
            chunk_size=4,
        )
        link.publish(up, encode(chunk, b"abcd"))
        # an ONNX block with a custom operator domain, with a correct digest
        evil = _custom_domain_block()
        evil_sha = hashlib.sha256(evil).hexdigest()
        link.publish(
            up,
            encode(
                chunk.model_copy(
                    update={
                        "model_id": spy.announce_block(t, "edge1", evil_sha, len(evil)),
                        "block_sha256": evil_sha,
                        "block_bytes": len(evil),
                        "chunk_size": len(evil),
                    }
                ),
                evil,
            ),
        )
        # a chunk larger than the edge accepts
        big = chunk.model_copy(
            update={
                "model_id": spy.announce_block(t, "edge1", "cd" * 32, 1 << 40),
                "block_sha256": "cd" * 32,
                "block_bytes": 1 << 40,
                "chunks": 1,
                "chunk_size": 1 << 40,
            }
        )
        link.publish(up, encode(big, b"x"))
        # a chunk of a model it never announced
        link.publish(up, encode(chunk.model_copy(update={"model_id": mid}), b"abcd"))
        want = [
            "bad_range",
            "bad_tensor",
            "digest_mismatch",
            "malformed",
            "rejected_block",
            "too_large",
            "unknown_model",
            "unknown_model",
            "unsupported_version",
        ]
        assert spy.wait_codes(want) == want
        by_code = {e.code: e for e in spy.errors}
        assert by_code["bad_range"].request_id == "bad-17-19"
        assert by_code["unsupported_version"].request_id == "v9"
        assert "expects float32[1, 7, 7, 320]" in by_code["bad_tensor"].message
        out = dev.query(np.zeros((1, 224, 224, 3), np.float32))
        assert out.offloaded  # still serving
    finally:
        spy.link.close()
        dev.close()


def _custom_domain_block() -> bytes:
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Exfiltrate", ["x"], ["y"], domain="com.evil")],
        "evil",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)]
    )
    return bytes(m.SerializeToString())


def test_a_query_that_expired_in_the_edge_queue_is_not_run(
    mobilenet: ModelPackage, edge: EdgeAgent, broker: BrokerUnderTest
) -> None:
    dev = _device(mobilenet, broker, split=17)
    spy = Stranger(broker)
    try:
        dev.upload()
        before = edge.stats.queries
        # a deadline shorter than any queueing: 0.001 ms
        spy.link.publish(
            edge.topics.edge_query("edge1", spy.who),
            encode_tensor_frame(
                Query,
                np.zeros((1, 7, 7, 320), np.float32),
                request_id="late",
                device=spy.who,
                model_id=mobilenet.manifest.model_id,
                start=17,
                end=18,
                deadline_ms=0.001,
            ),
        )
        assert spy.wait_codes(["deadline_expired"]) == ["deadline_expired"]
        assert edge.stats.queries == before
    finally:
        spy.link.close()
        dev.close()


def test_edges_are_found_from_their_retained_status(
    edge: EdgeAgent, broker: BrokerUnderTest
) -> None:
    from device_agent.session import edges_from_status

    sec = broker.security("ops")
    found = edges_from_status(broker.url, edge.topics.prefix, broker.protocol, security=sec)
    assert found == ["edge1"]
    edge.stop()  # publishes offline (retained): no longer offered
    assert edges_from_status(broker.url, edge.topics.prefix, broker.protocol, security=sec) == []


def test_an_upload_file_the_edge_cannot_decode_is_sent_again_unencoded(
    mobilenet: ModelPackage, edge: EdgeAgent, broker: BrokerUnderTest, tmp_path: Path
) -> None:
    """A package whose upload file of block 3 decodes to other bytes than its .onnx (a build
    bug, a bit flip before the manifest was written): the edge says bad_encoding and the
    device sends that block as its .onnx; the upload completes, nothing is lost."""
    import shutil
    import zlib

    from iotoffload.model.block_codec import shuffle
    from iotoffload.model.manifest import MANIFEST_NAME

    root = tmp_path / "pkg"
    shutil.copytree(mobilenet.root, root)
    m = json.loads((root / MANIFEST_NAME).read_text())
    b3 = m["blocks"][3]
    onnx = (root / b3["onnx"]).read_bytes()
    bad = zlib.compress(shuffle(onnx + b"\0" * 64, 4))  # 64 bytes longer once decoded
    assert len(bad) < len(onnx)
    (root / b3["upload"]["file"]).write_bytes(bad)
    b3["upload"].update(sha256=hashlib.sha256(bad).hexdigest(), bytes=len(bad))
    (root / MANIFEST_NAME).write_text(json.dumps(m))
    pkg = ModelPackage.load(root)
    dev = _device(pkg, broker, split=0)
    try:
        dev.upload()
        assert not dev.upload_errors
        assert dev.inventory.stored == list(range(18))
        assert edge.store.block_path(b3["onnx_sha256"]).read_bytes() == onnx
        # block 3 went twice (encoded, refused; then plain), every other block once encoded
        want = sum(b.upload_bytes for b in pkg.blocks) + len(onnx)
        assert dev.bytes_uploaded == want
        out = dev.query(np.zeros((1, 224, 224, 3), np.float32))
        assert out.offloaded, out.reason
    finally:
        dev.close()


def test_pixel_queries_run_the_same_tensor_from_a_quarter_of_the_bytes(
    mobilenet: ModelPackage, edge: EdgeAgent, broker: BrokerUnderTest
) -> None:
    """An image's uint8 pixels go to the edge as they are and are normalised there: the
    edge's answer is the float32 query's bit for bit; offloaded later, the device
    normalises them itself. A stranger's pixel queries that do not fit are refused."""
    dev = _device(mobilenet, broker, split=0)
    spy = Stranger(broker)
    try:
        dev.upload()
        prep = mobilenet.manifest.preprocessing
        assert prep is not None
        rng = np.random.default_rng(3)
        px = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        xf = normalize_pixels(px, prep.mean, prep.std)
        for k in (0, 5):
            by_px, by_f = dev.query(px, split=k), dev.query(xf, split=k)
            assert by_px.offloaded and by_f.offloaded, (by_px.reason, by_f.reason)
            assert np.array_equal(by_px.output, by_f.output)  # the same tensor ran
            if k == 0:
                assert by_px.wire_bytes < by_f.wire_bytes / 3.9  # uint8, not float32
            else:
                assert by_px.wire_bytes == by_f.wire_bytes  # block 5's float32 input
        local = dev.query(px, split=18)  # local all the way: normalised on the device
        assert not local.offloaded and np.array_equal(local.output, dev.tfl.run(0, 18, xf))
        # what no edge may accept: pixels of the wrong kind, or of a block's wrong shape
        t, mid, me = edge.topics, mobilenet.manifest.model_id, spy.who
        q = t.edge_query("edge1", me)

        def raw(rid: str, tensor: np.ndarray, start: int, pixels: dict[str, object]) -> bytes:
            wt = {"dtype": str(tensor.dtype), "shape": list(tensor.shape)}
            hdr = {
                "type": "query", "request_id": rid, "device": me, "model_id": mid,
                "start": start, "end": 18, "deadline_ms": 1000, "tensor": wt, "pixels": pixels,
            }  # fmt: skip
            hb = json.dumps(hdr).encode()
            return MAGIC + struct.pack(">BI", 2, len(hb)) + hb + tensor.tobytes()

        ok = {"mean": [1, 2, 3], "std": [1, 1, 1]}
        spy.link.publish(q, raw("floats", xf, 0, ok))  # float32 body called pixels
        spy.link.publish(q, raw("channels", px, 0, {"mean": [1, 2], "std": [1, 1]}))
        spy.link.publish(q, raw("zero-std", px, 0, {"mean": [1, 2, 3], "std": [0, 1, 1]}))
        spy.link.publish(q, raw("nan", px, 0, {"mean": [1, 2, 3], "std": [1, 1, "NaN"]}))
        spy.link.publish(q, raw("block5", px, 5, ok))  # block 0's shape, for block 5
        want = ["bad_tensor", *["invalid_header"] * 4]
        assert spy.wait_codes(want) == want
        by_id = {e.request_id: e.code for e in spy.errors}
        assert by_id["block5"] == "bad_tensor" and by_id["floats"] == "invalid_header"
        assert dev.query(px, split=0).offloaded  # still serving
    finally:
        spy.link.close()
        dev.close()
