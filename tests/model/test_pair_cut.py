"""Cutting a whole-model .tflite + .onnx pair without TensorFlow."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from iotoffload.model import CutError, ModelPackage, prepare_pair
from iotoffload.model.progress import SilentProgress
from iotoffload.runtime import OnnxExecutor, TFLiteExecutor

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair_pkg(
    whole_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> ModelPackage:
    tfl, onx = whole_pair
    return prepare_pair(tfl, onx, "mnv2-pair", tmp_path_factory.mktemp("pair") / "mnv2-pair")


def test_no_tensorflow_in_this_process(pair_pkg: ModelPackage) -> None:
    assert "tensorflow" not in sys.modules


def test_pair_gives_the_same_blocks_as_the_keras_build(
    pair_pkg: ModelPackage, mobilenet: ModelPackage
) -> None:
    assert pair_pkg.num_blocks == mobilenet.num_blocks == 18
    assert [b.output.shape for b in pair_pkg.blocks] == [b.output.shape for b in mobilenet.blocks]
    x = np.random.default_rng(11).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    ref_t = TFLiteExecutor.from_package(mobilenet)
    cut_t, cut_o = TFLiteExecutor.from_package(pair_pkg), OnnxExecutor.from_package(pair_pkg)
    for i in range(18):
        want = ref_t.run(i, i + 1, x)
        scale = float(np.max(np.abs(want)))
        assert np.max(np.abs(cut_t.run(i, i + 1, x) - want)) <= 1e-4 * scale, f"tflite {i}"
        assert np.max(np.abs(cut_o.run(i, i + 1, x) - want)) <= 1e-4 * scale, f"onnx {i}"
        x = want


def test_pair_package_is_verified(pair_pkg: ModelPackage) -> None:
    v = pair_pkg.manifest.verification
    assert v is not None and v.max_rel_error < 1e-4
    assert v.reference == "whole TFLite model"
    assert pair_pkg.manifest.weights == "user"


def test_all_policy_cuts_finer(whole_pair: tuple[Path, Path], tmp_path: Path) -> None:
    tfl, onx = whole_pair
    pkg = prepare_pair(tfl, onx, "fine", tmp_path / "fine", policy="all")
    assert pkg.num_blocks > 18
    assert pkg.manifest.verification is not None


def test_mismatched_pair_is_refused(
    whole_pair: tuple[Path, Path], mobilenet: ModelPackage, tmp_path: Path
) -> None:
    tfl, _ = whole_pair
    with pytest.raises(CutError, match=r"do not correspond|not compute the same"):
        prepare_pair(tfl, mobilenet.onnx_path(3), "bad", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_unreadable_files_are_clear_errors(whole_pair: tuple[Path, Path], tmp_path: Path) -> None:
    tfl, onx = whole_pair
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(CutError, match=r"junk\.onnx: not a readable ONNX model"):
        prepare_pair(tfl, junk, "j", tmp_path / "j", progress=SilentProgress())
    bad_tfl = tmp_path / "junk.tflite"
    bad_tfl.write_bytes(b"\x00" * 64)
    with pytest.raises(CutError, match=r"junk\.tflite"):
        prepare_pair(bad_tfl, onx, "j", tmp_path / "j")
