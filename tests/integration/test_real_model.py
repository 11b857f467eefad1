"""A real pretrained model on real photos, through the full offloading path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker.embedded import EmbeddedBroker
from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model import ModelPackage
from iotoffload.model.preprocess import load_input, sample_photos, top_k
from iotoffload.runtime import TFLiteExecutor

pytestmark = pytest.mark.integration
pytest.importorskip("skimage")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return sample_photos(tmp_path / "photos")


@pytest.fixture
def offloading(efficientnet: ModelPackage, tmp_path: Path) -> Iterator[DeviceAgent]:
    with EmbeddedBroker() as b:
        edge = EdgeAgent(
            EdgeConfig(id="e", broker=b.url, store=tmp_path / "s", advertise=False, protocol=311)
        )
        edge.start()
        dev = DeviceAgent(efficientnet, b.url, "e", protocol=311, deadline_ms=10_000)
        try:
            assert dev.connect() is not None
            dev.upload()
            yield dev
        finally:
            dev.close()
            edge.stop()


def test_package_records_real_weights_and_labels(efficientnet: ModelPackage) -> None:
    m = efficientnet.manifest
    assert m.weights == "imagenet" and m.weights_detail and "57934424" in m.weights_detail
    assert m.labels is not None and m.labels[285] == "Egyptian cat"
    assert m.preprocessing is not None and m.preprocessing.resample == "bicubic"


@pytest.mark.parametrize(
    ("photo", "classes"), [("chelsea", range(281, 286)), ("coffee", (967, 968))]
)
def test_photos_are_recognised_when_offloaded_at_several_splits(
    offloading: DeviceAgent,
    efficientnet: ModelPackage,
    photos: Path,
    photo: str,
    classes: range | tuple[int, ...],
) -> None:
    x = load_input(str(photos / f"{photo}.png"), efficientnet.manifest)
    local = TFLiteExecutor.from_package(efficientnet).run(0, efficientnet.num_blocks, x)
    want = top_k(local, efficientnet.manifest.labels)
    assert want[0][0] in classes
    for k in (0, 5, 11, 16):
        out = offloading.query(x, split=k)
        assert out.offloaded, out.reason
        got = top_k(out.output, efficientnet.manifest.labels)
        assert [c for c, _, _ in got] == [c for c, _, _ in want], k
        np.testing.assert_allclose(
            out.output, local, rtol=0, atol=1e-4 * float(np.abs(local).max())
        )
