"""Device and edge agents over a real broker: upload, offloaded queries, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model import ModelPackage
from iotoffload.runtime import TFLiteExecutor
from iotoffload.transport.frame import MAGIC
from tests.integration.conftest import BrokerUnderTest

pytestmark = pytest.mark.integration


def _edge(broker: BrokerUnderTest, store: Path) -> EdgeAgent:
    a = EdgeAgent(EdgeConfig(id="edge1", broker=broker.url, store=store, advertise=False,
                             protocol=broker.protocol))  # fmt: skip
    a.start()
    return a


@pytest.fixture
def edge(broker: BrokerUnderTest, tmp_path: Path) -> Iterator[EdgeAgent]:
    a = _edge(broker, tmp_path / "store")
    yield a
    a.stop()


def _device(pkg: ModelPackage, broker: BrokerUnderTest, **kw: object) -> DeviceAgent:
    d = DeviceAgent(pkg, broker.url, "edge1", protocol=broker.protocol, deadline_ms=5000, **kw)  # type: ignore[arg-type]
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
    d1 = _device(mobilenet, broker, split=9)
    d1.upload()
    assert d1.bytes_uploaded == sum(b.onnx_bytes for b in mobilenet.blocks)
    d1.close()
    d2 = _device(mobilenet, broker, split=9)
    d2.upload()
    assert d2.bytes_uploaded == 0
    d2.close()
    edge.stop()
    again = _edge(broker, tmp_path / "store")
    try:
        d3 = _device(mobilenet, broker, split=9)
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


def test_bad_input_gets_error_frames_and_the_edge_keeps_serving(
    mobilenet: ModelPackage, edge: EdgeAgent, broker: BrokerUnderTest
) -> None:
    dev = _device(mobilenet, broker, split=17)
    try:
        dev.upload()
        topics = edge.topics
        link = dev.link
        link.publish(topics.edge_query("edge1"), b"garbage")
        link.publish(topics.edge_query("edge1"), MAGIC + b"\x09\x00\x00\x00\x02{}")
        before = edge.stats.errors
        # a block range out of bounds and an unknown model: error frames with request ids
        from iotoffload.transport.frame import Query, encode_tensor_frame

        x = np.zeros((1, 7, 7, 320), np.float32)
        for start, end, mid in ((17, 19, mobilenet.manifest.model_id), (17, 18, "0" * 64)):
            link.publish(topics.edge_query("edge1"), encode_tensor_frame(
                Query, x, request_id=f"bad-{start}-{end}", device=dev.device_id, model_id=mid,
                start=start, end=end, deadline_ms=100))  # fmt: skip
        import time

        t_end = time.monotonic() + 5
        while edge.stats.errors < before + 2 and time.monotonic() < t_end:
            time.sleep(0.05)
        assert edge.stats.error_codes.get("bad_range") == 1
        assert edge.stats.error_codes.get("unknown_model") == 1
        assert edge.stats.error_codes.get("malformed", 0) >= 1
        out = dev.query(np.zeros((1, 224, 224, 3), np.float32))
        assert out.offloaded  # still serving
    finally:
        dev.close()
