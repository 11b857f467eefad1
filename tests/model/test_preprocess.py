"""Image preprocessing: pixels and their normalisation, which the device and the edge share."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from PIL import Image

from edge_agent.workers import PixelInput, _write_input, input_nbytes
from iotoffload.model.manifest import Preprocessing
from iotoffload.model.preprocess import normalize_pixels, pil_pixels, preprocess_pil
from iotoffload.transport.frame import Pixels

PREP = Preprocessing(
    size=(8, 6), crop_fraction=0.875, resample="bilinear", mean=[120.5, 110.0, 100.25],
    std=[58.4, 57.1, 57.4],
)  # fmt: skip


def _image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))


def test_normalize_pixels_is_the_hand_computed_formula() -> None:
    px = np.array([[[[0, 255, 10]]]], np.uint8)
    out = normalize_pixels(px, [10.0, 5.0, 10.0], [2.0, 5.0, 4.0])
    assert out.dtype == np.float32 and out.tolist() == [[[[-5.0, 50.0, 0.0]]]]
    nchw = px.transpose(0, 3, 1, 2)  # (1, 3, 1, 1): the channels on axis 1
    got = normalize_pixels(nchw, [10.0, 5.0, 10.0], [2.0, 5.0, 4.0], "NCHW")
    assert got.reshape(-1).tolist() == [-5.0, 50.0, 0.0]


def test_preprocessing_is_pixels_then_normalisation_in_either_layout() -> None:
    for layout in ("NHWC", "NCHW"):
        px = pil_pixels(_image(), PREP, layout)
        assert px.dtype == np.uint8 and px.shape == (
            (1, 8, 6, 3) if layout == "NHWC" else (1, 3, 8, 6)
        )
        x = preprocess_pil(_image(), PREP, layout)
        assert np.array_equal(x, normalize_pixels(px, PREP.mean, PREP.std, layout))
    # the formula before pixels were split out, for an NHWC image
    box = (6.875, 1.875, 33.125, 28.125)  # the centred 26.25 px square of a 40x30 image
    img = _image().resize((6, 8), Image.Resampling.BILINEAR, box=box)
    old = (np.asarray(img, np.float32) - np.asarray(PREP.mean, np.float32)) / np.asarray(
        PREP.std, np.float32
    )
    assert np.array_equal(preprocess_pil(_image(), PREP), old[None])


def test_the_edge_writes_normalised_pixels_into_the_shared_buffer() -> None:
    px = pil_pixels(_image(), PREP)
    p = Pixels(mean=list(PREP.mean), std=list(PREP.std))
    x = PixelInput(memoryview(px.tobytes()), px.shape, p)
    assert input_nbytes(x) == 4 * px.size and input_nbytes(b"abc") == 3
    mm = mmap.mmap(-1, 64 + input_nbytes(x))
    try:
        _write_input(mm, 64, x)
        got = np.frombuffer(mm, np.float32, count=px.size, offset=64).reshape(px.shape).copy()
        assert np.array_equal(got, preprocess_pil(_image(), PREP))  # bit for bit
        _write_input(mm, 0, b"\x01\x02")
        assert mm[:2] == b"\x01\x02"
    finally:
        mm.close()  # no view of it is left (a view would make this raise)


def test_pixels_that_do_not_fit_the_normalisation_are_refused() -> None:
    px = np.zeros((1, 2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="one mean and std per channel"):
        normalize_pixels(px, [0.0, 0.0], [1.0, 1.0])  # 3 channels, 2 means
    with pytest.raises(ValueError, match="one mean and std per channel"):
        normalize_pixels(px.astype(np.int16), [0.0] * 3, [1.0] * 3)  # not uint8
    with pytest.raises(ValueError, match="one mean and std per channel"):
        normalize_pixels(px, [0.0] * 3, [1.0] * 2)  # 3 means, 2 stds
