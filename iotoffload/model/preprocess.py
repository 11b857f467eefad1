"""Turning user inputs (images, .npy files, 'synthetic') into a model's input tensor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iotoffload.model.errors import ModelError
from iotoffload.model.manifest import Manifest, Preprocessing
from iotoffload.runtime.base import Array

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def preprocess_image(
    path: Path, prep: Preprocessing, layout: str = "NHWC", *, pixels: bool = False
) -> Array:
    """Center-crop, resize and normalise an image file into a (1, H, W, 3) float32 tensor
    (``pixels``: the uint8 pixels before normalising, ``pil_pixels``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ModelError(f"{path}: not a readable image: {e}") from e
    return pil_pixels(img, prep, layout) if pixels else preprocess_pil(img, prep, layout)


def preprocess_pil(img: Any, prep: Preprocessing, layout: str = "NHWC") -> Array:
    """The same for a PIL RGB image in memory (the package build's sample inputs)."""
    return normalize_pixels(pil_pixels(img, prep, layout), prep.mean, prep.std, layout)


def pil_pixels(img: Any, prep: Preprocessing, layout: str = "NHWC") -> Array:
    """The cropped, resized image as uint8 pixels in the model's input shape, not yet
    normalised: what a device may send the edge for block 0 (a quarter of the float32
    tensor's bytes), which normalises it exactly as ``normalize_pixels`` does here."""
    from PIL import Image

    resample = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
    }[prep.resample]
    w, h = img.size
    side = min(w, h) * prep.crop_fraction
    left, top = (w - side) / 2, (h - side) / 2
    img = img.convert("RGB").resize(
        (prep.size[1], prep.size[0]), resample, box=(left, top, left + side, top + side)
    )
    x = np.asarray(img, dtype=np.uint8)[None]
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def channel_axis(layout: str) -> int:
    return 1 if layout == "NCHW" else 3


def normalize_pixels(
    pixels: Array,
    mean: Sequence[float],
    std: Sequence[float],
    layout: str = "NHWC",
    out: Array | None = None,
) -> Array:
    """uint8 pixels (1, H, W, C) or (1, C, H, W) to the model's float32 input: per channel
    (x - mean) / std in float32. The device's preprocessing and the edge's handling of a
    pixel query both call this: the same operations in the same order, so the same tensor
    bit for bit wherever it is computed. ``out``: a float32 array of the pixels' shape to
    write into (the edge's shared buffer)."""
    # A pixel has 256 values: each channel's (v - mean) / std is computed once per value, in
    # float32 as an elementwise pass would (the same result, bit for bit), and looked up: half
    # the CPU of subtracting and dividing 150,528 floats, which a slowed device pays per query.
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    axis = channel_axis(layout)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or not pixels.shape[axis] == len(m) == len(s):
        raise ValueError(
            f"pixels {pixels.dtype}{list(pixels.shape)} ({layout}) for {len(m)} means and "
            f"{len(s)} stds: uint8 with one mean and std per channel"
        )
    table = (np.arange(256, dtype=np.float32)[None, :] - m[:, None]) / s[:, None]
    if out is None:
        out = np.empty(pixels.shape, np.float32)
    for c in range(len(m)):
        at = (slice(None),) * axis + (c,)
        np.take(table[c], pixels[at], out=out[at], mode="wrap")  # uint8 indices: all valid
    return out


def synthetic_input(manifest: Manifest, seed: int = 0) -> Array:
    """A reproducible random input in the normalised range ([-1, 1])."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, manifest.input.shape).astype(manifest.input.dtype)


SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat")


def sample_photos(folder: Path) -> Path:
    """Write scikit-image's sample photos (real pictures that ship with the package) as PNGs
    into ``folder``: the demo's default inputs."""
    try:
        import skimage.data
    except ImportError as e:
        raise ModelError("sample photos need scikit-image: pip install 'iotoffload[photos]'") from e
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        path = folder / f"{name}.png"
        if not path.is_file():
            Image.fromarray(getattr(skimage.data, name)()).save(path)
    return folder


def load_input(ref: str, manifest: Manifest, seed: int = 0, *, pixels: bool = False) -> Array:
    """``synthetic``, a ``.npy`` file of the exact input shape, or an image file (with
    ``pixels``, of a float32 model: its uint8 pixels, which the device agent normalises
    where it runs block 0, and sends the edge as they are)."""
    if ref == "synthetic":
        return synthetic_input(manifest, seed)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ModelError(f"input {ref!r}: no such file (or use 'synthetic')")
    if path.suffix.lower() == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ModelError(f"{path}: not a plain .npy array: {e}") from e
        if tuple(x.shape) != manifest.input.shape:
            raise ModelError(
                f"{path}: shape {list(x.shape)}, the model takes {list(manifest.input.shape)}"
            )
        return np.ascontiguousarray(x.astype(manifest.input.dtype, copy=False))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if manifest.preprocessing is None:
            raise ModelError(
                f"model {manifest.name} records no image preprocessing; give a .npy input"
            )
        pixels = pixels and manifest.input.dtype == "float32"
        return preprocess_image(path, manifest.preprocessing, manifest.input.layout, pixels=pixels)
    raise ModelError(f"{path}: unsupported input type (an image, a .npy file or 'synthetic')")


def top_k(scores: Array, labels: list[str] | None, k: int = 5) -> list[tuple[int, str, float]]:
    """(class index, label, probability) of the k highest scores; logits (a model without a
    softmax head) are turned into probabilities first."""
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    if flat.min() < 0 or abs(flat.sum() - 1.0) > 1e-3:
        e = np.exp(flat - flat.max())
        flat = e / e.sum()
    idx = np.argsort(-flat)[:k]
    return [
        (int(i), labels[i] if labels and i < len(labels) else f"class {int(i)}", float(flat[i]))
        for i in idx
    ]
