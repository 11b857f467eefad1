"""The catalog mobilenet built through TensorFlow (in a worker process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from iotoffload.model import CATALOG, BuildError, ModelPackage, prepare_catalog
from iotoffload.model.progress import SilentProgress
from iotoffload.model.verify import load_reference, split_errors, verify_package
from iotoffload.runtime import OnnxExecutor, TFLiteExecutor
from tests.conftest import KERAS_MOBILENET_CUTS

pytestmark = pytest.mark.integration


def test_mobilenet_is_cut_at_every_block_boundary(mobilenet: ModelPackage) -> None:
    blocks = mobilenet.blocks
    assert len(blocks) == 18
    assert [b.output.name for b in blocks] == KERAS_MOBILENET_CUTS
    assert blocks[0].input.shape == (1, 224, 224, 3)  # NHWC at the input …
    assert blocks[-1].output.shape == (1, 1000)
    assert blocks[1].output.shape == (1, 56, 56, 24)  # … and at every boundary
    assert blocks[16].output.shape == (1, 7, 7, 320)
    # the head carries about half of the weights (research.md: 6.8 of 14 MB)
    total = sum(b.param_bytes for b in blocks)
    assert 0.4 < blocks[17].param_bytes / total < 0.6
    assert 500e6 < sum(b.flops for b in blocks) < 700e6  # ~300 M multiply-adds


def test_manifest_records_seeded_weights(mobilenet: ModelPackage) -> None:
    m = json.loads((mobilenet.root / "manifest.json").read_text())
    for key in ("format", "name", "model_id", "weights", "input", "labels", "blocks"):
        assert key in m
    assert m["weights"] == "seeded" and m["weights_detail"] == "seed=0"
    b = m["blocks"][4]
    for key in (
        "index",
        "tflite",
        "onnx",
        "tflite_sha256",
        "onnx_sha256",
        "input",
        "output",
        "output_bytes",
        "param_bytes",
        "flops",
    ):
        assert key in b
    assert b["output"] == {"name": "block_4_add", "shape": [1, 28, 28, 32], "dtype": "float32"}


def test_every_split_matches_the_whole_model(mobilenet: ModelPackage) -> None:
    v = verify_package(mobilenet)
    assert v.max_rel_error < 1e-4
    x, ref = load_reference(mobilenet.root)
    report = split_errors(
        TFLiteExecutor.from_package(mobilenet), OnnxExecutor.from_package(mobilenet), x, ref
    )
    assert len(report.errors) == 19
    assert report.max_error < 1e-4


def test_splits_agree_on_a_fresh_input(mobilenet: ModelPackage) -> None:
    x = np.random.default_rng(123).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    tfl, ort = TFLiteExecutor.from_package(mobilenet), OnnxExecutor.from_package(mobilenet)
    whole_tfl = tfl.run(0, 18, x)
    for k in (0, 3, 9, 17, 18):
        y = ort.run(k, 18, tfl.run(0, k, x))
        assert np.max(np.abs(y - whole_tfl)) <= 1e-4 * np.max(np.abs(whole_tfl))


def test_seeded_weights_are_not_trivial(mobilenet: ModelPackage) -> None:
    tfl = TFLiteExecutor.from_package(mobilenet)
    rng = np.random.default_rng(7)
    a = tfl.run(0, 18, rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32))
    b = tfl.run(0, 18, rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32))
    assert abs(float(a.sum()) - 1.0) < 1e-3  # softmax
    assert not np.allclose(a, b, rtol=1e-3, atol=0)  # depends on the input
    assert float(a.max() / a.min()) > 1.01  # not a flat distribution
    # batch-norm statistics were randomised: an intermediate tensor is not all one sign
    mid = tfl.run(0, 6, rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32))
    assert (mid > 0).any() and (mid < 0).any()


def test_insisting_on_imagenet_fails_clearly_offline(tmp_path: Path) -> None:
    if (Path.home() / ".keras" / "models").is_dir() and any(
        (Path.home() / ".keras" / "models").glob("mobilenet_v2*")
    ):
        pytest.skip("ImageNet weights are cached on this machine")
    with pytest.raises(BuildError, match="ImageNet weights are not obtainable"):
        prepare_catalog(CATALOG["mobilenet"], tmp_path / "m", weights="imagenet")
    assert not (tmp_path / "m").exists()  # nothing half-built is left behind
    assert not list(tmp_path.glob(".m.staging-*"))


def test_existing_package_is_not_overwritten_without_force(
    mobilenet: ModelPackage,
) -> None:
    with pytest.raises(BuildError, match="already exists"):
        prepare_catalog(CATALOG["mobilenet"], mobilenet.root, weights="seeded")


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="weights file not found"):
        prepare_catalog(
            CATALOG["mobilenet"],
            tmp_path / "m",
            weights=str(tmp_path / "nope.h5"),
            progress=SilentProgress(),
        )
