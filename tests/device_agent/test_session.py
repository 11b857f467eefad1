from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_agent.session import iter_inputs
from iotoffload.model import ModelError, ModelPackage
from iotoffload.model.preprocess import normalize_pixels


def test_folder_inputs_cycle_through_images_and_arrays(
    mobilenet: ModelPackage, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), np.uint8)).save(tmp_path / "a.jpg")
    np.save(tmp_path / "b.npy", np.ones((1, 224, 224, 3), np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    got = list(iter_inputs(str(tmp_path), mobilenet, 5))
    assert [n for n, _ in got] == ["a.jpg", "b.npy", "a.jpg", "b.npy", "a.jpg"]
    assert all(x.shape == (1, 224, 224, 3) for _, x in got)
    # images as their pixels (the agent normalises them where block 0 runs), arrays as given
    assert [x.dtype for _, x in got[:2]] == [np.uint8, np.float32]
    prep = mobilenet.manifest.preprocessing
    assert prep is not None
    x = normalize_pixels(got[0][1], prep.mean, prep.std)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # (p-127.5)/127.5


def test_synthetic_inputs_differ_and_empty_folder_is_an_error(
    mobilenet: ModelPackage, tmp_path: Path
) -> None:
    a, b = (x for _, x in iter_inputs("synthetic", mobilenet, 2))
    assert not np.array_equal(a, b)
    with pytest.raises(ModelError, match="no images"):
        list(iter_inputs(str(tmp_path), mobilenet, 1))
