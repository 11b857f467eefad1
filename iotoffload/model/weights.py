"""Upload forms: a package's ONNX blocks with float16 or int8 weight-only weights.

A device uploads every ONNX block it wants the edge to run, and the weights are almost all of a
block's bytes. A *variant* of a float32 package stores its large float weights smaller and
decodes them back to float32 inside the graph:

- ``float16``: ``W`` becomes a float16 initializer and a ``Cast(to=FLOAT)`` node named ``W``;
- ``int8``: a weight of Conv/ConvTranspose/Gemm/MatMul becomes int8 values, symmetric per output
  channel (``scale_c = max|W_c| / 127``, ``q = round(W / scale_c)`` in [-127, 127]), and a
  float32 scale, rebuilt as ``Mul(Cast(q, FLOAT), scale)`` named ``W``. Other large float
  tensors (biases, Add/Mul operands) are stored as float16: their error lands on the output as
  it is, while a weight's error is averaged over a dot product.

The node producing ``W`` keeps the initializer's name, so every consumer and the block's input
and output (names, shapes, dtypes: what the edge checks against the announced spec) stay as they
were. ONNX Runtime's constant folding (on at its default optimisation level, which the edge
uses) evaluates these nodes once at session creation: the session holds float32 weights and
runs exactly the kernels of the float32 block, while the device uploads a half or a quarter of
the bytes. ``DequantizeLinear`` says the same in one node, but ONNX Runtime keeps it out of
constant folding (it looks for QDQ patterns) and so dequantises on every query, and the Conv
is no longer fused or given the blocked layout: whole chains measured 1.3-2.3x slower (ResNet-50
94.6 against 70.6 ms, efficientnet-lite0 25.0 against 10.9 ms; ``int8_style`` keeps it for
measurement only). Small tensors (< ``MIN_ELEMENTS`` elements) and anything not float32 stay as
they are. Every op added (Cast, Mul, DequantizeLinear) is in the edge's allowed ops.

A variant is accepted only when its outputs agree with the float32 package's: the top-1
(argmax) of the whole ONNX chain of each, over a deterministic sample set built from images
that installed packages ship (scikit-image's and matplotlib's sample photos, plus deterministic
crops, flips and colour jitter of them, plus synthetic structured images), preprocessed as the
package says. Below ``AGREEMENT_THRESHOLD`` the build refuses the form (:class:`AgreementError`,
with the figure), and ``auto`` picks the smallest form that holds (int8, else float16, else
float32).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iotoffload.model.errors import BuildError, ModelError, VerificationError
from iotoffload.model.manifest import (
    MANIFEST_NAME,
    Agreement,
    Manifest,
    Preprocessing,
    UploadWeights,
    compute_model_id,
    sha256_file,
)
from iotoffload.model.package import ModelPackage
from iotoffload.model.preprocess import preprocess_pil
from iotoffload.model.progress import Progress, SilentProgress
from iotoffload.model.upload_files import encode_blocks
from iotoffload.model.verify import REFERENCE_NAME, rel_error, tolerance_for, verify_package
from iotoffload.runtime.base import Array, BlockFile

# smaller float tensors (biases, norms) stay float32: converting them saves few bytes, and their
# error lands on the output unaveraged
MIN_ELEMENTS = 1024
AGREEMENT_THRESHOLD = 0.99
DEFAULT_SAMPLES = 256
FP16_MAX = 65504.0  # the largest finite float16
MIN_OPSET = 13  # Cast and Mul with numpy broadcasting; DequantizeLinear with an axis

UploadChoice = Literal["auto", "float32", "float16", "int8"]
UPLOAD_CHOICES: tuple[UploadChoice, ...] = ("auto", "float32", "float16", "int8")
Int8Style = Literal["cast_mul", "dequantize_linear"]
# int8 first: auto takes the first form that holds, the smallest
AUTO_ORDER: tuple[UploadWeights, ...] = ("int8", "float16")

_FLOAT = 1  # onnx.TensorProto.FLOAT
_FORM_BYTES = {"float32": 4, "float16": 2, "int8": 1}


class ConversionError(BuildError):
    """An ONNX block cannot be converted to an upload form (the message says why)."""


class AgreementError(VerificationError):
    """A variant whose top-1 agreement with its float32 package is below the threshold."""

    def __init__(self, name: str, form: UploadWeights, agreement: Agreement) -> None:
        a = agreement
        super().__init__(
            f"{name}: {form} upload weights refused: top-1 agreement with float32 is "
            f"{a.top1 * 100:.1f} % over {a.samples} samples ({round(a.top1 * a.samples)} of "
            f"{a.samples} agree), below the required {a.threshold * 100:g} % (max relative "
            f"error {a.max_rel_error:.3g})"
        )
        self.form = form
        self.agreement = agreement


# quantisation (pure) -----------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Weights:
    """Symmetric int8 weights: ``values * scale`` approximates the float tensor."""

    values: npt.NDArray[np.int8]
    scale: npt.NDArray[np.float32]  # broadcastable to values: 1 on every axis but ``axis``
    axis: int | None  # the per-channel axis; None: one scale for the whole tensor

    def dequantize(self) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = self.values.astype(np.float32) * self.scale
        return out


def quantize_int8(w: npt.ArrayLike, axis: int | None) -> Int8Weights:
    """Per-channel (along ``axis``) or per-tensor symmetric int8: ``scale = max|w| / 127``.

    An all-zero channel gets scale 1 (its values are 0 anyway). Values are
    rounded half to even and clipped to [-127, 127] (symmetric: -128 is never used).
    """
    a = np.asarray(w, dtype=np.float32)
    if a.size == 0:
        raise ValueError("cannot quantise an empty tensor")
    if not np.all(np.isfinite(a)):
        raise ValueError("cannot quantise a tensor with NaN or infinite values")
    if axis is not None and not -a.ndim <= axis < a.ndim:
        raise ValueError(f"axis {axis} is outside a tensor of {a.ndim} dimensions")
    if axis is None:
        reduce: tuple[int, ...] = tuple(range(a.ndim))
    else:
        axis %= a.ndim
        reduce = tuple(i for i in range(a.ndim) if i != axis)
    scale = (np.max(np.abs(a), axis=reduce, keepdims=True) / np.float32(127)).astype(np.float32)
    # an all-zero channel (or one so small that /127 underflows) would divide by zero
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(a / scale), -127, 127).astype(np.int8)
    return Int8Weights(q, scale, axis)


# which axis of a weight is its output channel ------------------------------------------------
@dataclass(frozen=True)
class WeightUse:
    weight: bool  # consumed in a slot that is multiplied (Conv/Gemm/MatMul weights)
    axis: int | None  # its output-channel axis when weight, resolved for the tensor's rank


def _attr_int(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _use(node: Any, slot: int, ndim: int) -> WeightUse:
    """How ``node`` consumes its input ``slot`` (a tensor of ``ndim`` dimensions)."""
    op = node.op_type
    if op == "Conv" and slot == 1:  # W [M, C/g, k...]
        return WeightUse(True, 0 if ndim >= 1 else None)
    if op == "ConvTranspose" and slot == 1:  # W [C, M/g, k...]
        return WeightUse(True, 1 if ndim >= 2 else None)
    if op == "MatMul" and slot in (0, 1):  # B [.., K, N]: columns; A [.., M, K]: rows
        if ndim < 2:
            return WeightUse(True, None)
        return WeightUse(True, ndim - 1 if slot == 1 else ndim - 2)
    if op == "Gemm" and slot in (0, 1) and ndim == 2:  # C (slot 2) is a bias
        if slot == 0:
            return WeightUse(True, 1 if _attr_int(node, "transA", 0) else 0)
        return WeightUse(True, 0 if _attr_int(node, "transB", 0) else 1)
    return WeightUse(False, None)


def _subgraph_names(graph: Any) -> set[str]:
    """Every name a node inside any If/Loop/Scan body reads (outer-scope uses included)."""
    names: set[str] = set()
    todo = [a.g for n in graph.node for a in n.attribute if a.HasField("g")]
    todo += [g for n in graph.node for a in n.attribute for g in a.graphs]
    while todo:
        g = todo.pop()
        for n in g.node:
            names.update(n.input)
            todo += [a.g for a in n.attribute if a.HasField("g")]
            todo += [sub for a in n.attribute for sub in a.graphs]
    return names


def weight_axes(graph: Any) -> dict[str, WeightUse]:
    """For each initializer of the main graph that a node reads: how it is used.

    A tensor is a weight only when every use is a weight slot with the same axis; weight uses
    with different axes give one scale for the whole tensor (axis None); any other use (a bias,
    an Add, a use inside a subgraph) makes it not a weight.
    """
    dims = {t.name: len(t.dims) for t in graph.initializer}
    in_subgraph = _subgraph_names(graph)
    uses: dict[str, list[WeightUse]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in dims:
                uses.setdefault(name, []).append(_use(node, slot, dims[name]))
    out: dict[str, WeightUse] = {}
    for name, us in uses.items():
        if name in in_subgraph or not all(u.weight for u in us):
            out[name] = WeightUse(False, None)
        elif len({u.axis for u in us}) == 1:
            out[name] = us[0]
        else:
            out[name] = WeightUse(True, None)
    for name in in_subgraph & (dims.keys() - out.keys()):  # read only inside a subgraph
        out[name] = WeightUse(False, None)
    return out


# converting one block ----------------------------------------------------------------------
@dataclass(frozen=True)
class TensorChange:
    name: str
    elements: int
    stored: UploadWeights  # what the tensor is stored as now
    axis: int | None = None  # int8: the per-channel axis
    note: str = ""  # why a candidate stayed float32


@dataclass(frozen=True)
class ConversionReport:
    form: UploadWeights
    changes: tuple[TensorChange, ...]

    @property
    def converted(self) -> int:
        return sum(1 for c in self.changes if c.stored != "float32")

    @property
    def kept(self) -> tuple[TensorChange, ...]:
        """Large float32 tensors that stayed float32, each with its reason."""
        return tuple(c for c in self.changes if c.stored == "float32")

    @property
    def weight_bytes_before(self) -> int:
        return sum(4 * c.elements for c in self.changes)

    @property
    def weight_bytes_after(self) -> int:
        return sum(_FORM_BYTES[c.stored] * c.elements for c in self.changes)


def _opset(model: Any) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


class _Names:
    """Fresh tensor names that collide with nothing in the graph."""

    def __init__(self, graph: Any) -> None:
        self.used: set[str] = set()
        todo = [graph]  # subgraphs too: a body sees (and may shadow) the outer names
        while todo:
            g = todo.pop()
            self.used |= {t.name for t in g.initializer}
            self.used |= {v.name for v in (*g.input, *g.output, *g.value_info)}
            for n in g.node:
                self.used.update(n.input)
                self.used.update(n.output)
                self.used.add(n.name)
                todo += [a.g for a in n.attribute if a.HasField("g")]
                todo += [sub for a in n.attribute for sub in a.graphs]

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}{k}"
        self.used.add(name)
        return name


def convert_model(
    model: Any,
    form: UploadWeights,
    *,
    min_elements: int = MIN_ELEMENTS,
    int8_style: Int8Style = "cast_mul",
) -> tuple[Any, ConversionReport]:
    """A copy of ``model`` (an ``onnx.ModelProto``) with its weights in ``form``.

    Raises ConversionError when the graph's opset is too old for the nodes added.
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if form == "float32":
        return m, ConversionReport(form, ())
    if _opset(m) < MIN_OPSET:
        raise ConversionError(
            f"opset {_opset(m)} is too old for {form} weights (needs {MIN_OPSET} or newer)"
        )
    g = m.graph
    names = _Names(g)
    uses = weight_axes(g)
    # an initializer that is also a graph input may be fed by the caller; one that is a graph
    # output is returned as it is: both keep their float32 tensor
    boundary = {v.name for v in (*g.input, *g.output)}
    inits: list[Any] = []
    decode: list[Any] = []  # the nodes that rebuild float32 weights, placed before all others
    changes: list[TensorChange] = []
    for t in g.initializer:
        n = math.prod(t.dims)
        if (
            t.data_type != _FLOAT
            or n < min_elements
            or t.data_location == onnx.TensorProto.EXTERNAL
            or t.name not in uses
        ):
            inits.append(t)
            continue
        if t.name in boundary:
            inits.append(t)
            changes.append(TensorChange(t.name, n, "float32", note="a graph input or output"))
            continue
        try:
            w = numpy_helper.to_array(t).astype(np.float32, copy=False)
        except (ValueError, TypeError) as e:  # raw data that does not fit its dims
            raise ConversionError(f"initializer {t.name!r} cannot be read: {e}") from e
        if not np.all(np.isfinite(w)):
            inits.append(t)
            changes.append(TensorChange(t.name, n, "float32", note="holds NaN or infinity"))
            continue
        use = uses[t.name]
        if form == "int8" and use.weight:
            q = quantize_int8(w, use.axis)
            qname, sname = names.fresh(f"{t.name}__int8"), names.fresh(f"{t.name}__scale")
            inits.append(numpy_helper.from_array(q.values, qname))
            if int8_style == "dequantize_linear":
                zname = names.fresh(f"{t.name}__zero")
                scale = q.scale.reshape(-1) if q.axis is not None else q.scale.reshape(())
                inits.append(numpy_helper.from_array(scale, sname))
                inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), zname))
                dq = helper.make_node(
                    "DequantizeLinear",
                    [qname, sname, zname],
                    [t.name],
                    name=names.fresh(f"{t.name}__dequantize"),
                )
                if q.axis is not None:
                    dq.attribute.append(helper.make_attribute("axis", q.axis))
                decode.append(dq)
            else:
                fname = names.fresh(f"{t.name}__int8_as_float")
                inits.append(numpy_helper.from_array(q.scale, sname))
                decode.append(
                    helper.make_node(
                        "Cast", [qname], [fname], to=_FLOAT, name=names.fresh(f"{t.name}__cast")
                    )
                )
                decode.append(
                    helper.make_node(
                        "Mul", [fname, sname], [t.name], name=names.fresh(f"{t.name}__rescale")
                    )
                )
            changes.append(TensorChange(t.name, n, "int8", axis=q.axis))
            continue
        if float(np.max(np.abs(w))) > FP16_MAX:
            inits.append(t)
            changes.append(TensorChange(t.name, n, "float32", note="beyond float16's range"))
            continue
        hname = names.fresh(f"{t.name}__float16")
        inits.append(numpy_helper.from_array(w.astype(np.float16), hname))
        decode.append(
            helper.make_node(
                "Cast", [hname], [t.name], to=_FLOAT, name=names.fresh(f"{t.name}__cast")
            )
        )
        changes.append(TensorChange(t.name, n, "float16"))
    del g.initializer[:]
    g.initializer.extend(inits)
    nodes = [*decode, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    return m, ConversionReport(form, tuple(changes))


def _io_signature(model: Any) -> bytes:
    g = model.graph
    return b"".join(v.SerializeToString() for v in (*g.input, *g.output))


def convert_onnx_bytes(
    data: bytes,
    form: UploadWeights,
    *,
    min_elements: int = MIN_ELEMENTS,
    int8_style: Int8Style = "cast_mul",
) -> tuple[bytes, ConversionReport]:
    """An ONNX block's bytes converted to ``form``; the input/output declarations unchanged."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf raises its own DecodeError and friends
        raise ConversionError(f"not an ONNX model: {e}") from e
    out, report = convert_model(model, form, min_elements=min_elements, int8_style=int8_style)
    if _io_signature(out) != _io_signature(model):  # pragma: no cover - guarded by construction
        raise ConversionError("the conversion changed the block's input or output")
    return out.SerializeToString(), report


# sample inputs -----------------------------------------------------------------------------
_PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")
_MIN_PHOTO_SIDE = 128


def _package_dir(module: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_photos() -> list[tuple[str, Path]]:
    """Sample pictures that installed packages ship (scikit-image's data folder, matplotlib's
    sample_data), as (source, path), in a fixed order. None is downloaded."""
    found: list[tuple[str, Path]] = []
    for module, sub in (("skimage", "data"), ("matplotlib", "mpl-data/sample_data")):
        root = _package_dir(module)
        if root is None or not (root / sub).is_dir():
            continue
        for p in sorted((root / sub).iterdir()):
            if p.suffix.lower() in _PHOTO_SUFFIXES and p.is_file():
                found.append((module, p))
    return found


def _load_photos(paths: Sequence[tuple[str, Path]]) -> list[tuple[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for source, p in paths:
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError):
            continue  # a file that is no picture is simply not a sample
        digest = hashlib.sha256(img.tobytes()).hexdigest()
        # the same picture twice (scikit-image ships its chessboard in grey and in RGB)
        # would count twice in the agreement
        if min(img.size) >= _MIN_PHOTO_SIDE and digest not in seen:
            seen.add(digest)
            out.append((source, img))
    return out


def image_to_input(img: Any, prep: Preprocessing, layout: str = "NHWC") -> Array:
    """A PIL RGB image through the package's preprocessing (what a file would get)."""
    return preprocess_pil(img, prep, layout)


def augment(img: Any, rng: np.random.Generator) -> Any:
    """A random-resized crop (35 % of the area to all of it, aspect 3:4 to 4:3), a
    horizontal flip half the time, and brightness, contrast and saturation jitter of ±30 %."""
    from PIL import Image, ImageEnhance

    w, h = img.size
    area = w * h * rng.uniform(0.35, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, round(math.sqrt(area * ratio)))
    ch = min(h, round(math.sqrt(area / ratio)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(float(rng.uniform(0.7, 1.3)))
    return out


def synthetic_image(kind: int, size: tuple[int, int], rng: np.random.Generator) -> Any:
    """A structured RGB picture: 0 a colour gradient, 1 stripes or a checkerboard, 2 colour
    blobs, 3 smooth noise texture. Not photographs, but not flat noise either: edges, colour
    regions and textures that exercise every channel of a network."""
    from PIL import Image

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    kind %= 4
    if kind == 0:
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)[..., None]
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        rgb = c0 + (c1 - c0) * (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:
        f = rng.uniform(3, 24)
        a = rng.uniform(0, math.pi)
        u = np.cos(a) * xx + np.sin(a) * yy
        v = -np.sin(a) * xx + np.cos(a) * yy
        on = np.floor(u * f) % 2 if rng.random() < 0.5 else (np.floor(u * f) + np.floor(v * f)) % 2
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        rgb = np.where(on[..., None] > 0, c1, c0)
    elif kind == 2:
        rgb = np.broadcast_to(rng.uniform(0, 255, 3), (h, w, 3)).copy()
        for _ in range(int(rng.integers(3, 9))):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            rgb = rgb * (1 - m) + rng.uniform(0, 255, 3) * m
    else:
        cells = int(rng.integers(4, 32))
        small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        big = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        rgb = np.asarray(big, dtype=np.float32)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))  # H×W×3 uint8: RGB


@dataclass(frozen=True)
class SampleSet:
    inputs: tuple[Array, ...]
    description: str  # what they are, ending with their sha256 (the set is reproducible)

    def __len__(self) -> int:
        return len(self.inputs)


def _image_geometry(m: Manifest) -> tuple[int, int] | None:
    """(H, W) when the model takes one RGB picture its preprocessing can make."""
    prep, shape = m.preprocessing, m.input.shape
    if prep is None or m.input.dtype != "float32" or len(shape) != 4 or shape[0] != 1:
        return None
    hw = shape[1:3] if m.input.layout == "NHWC" else shape[2:4]
    channels = shape[3] if m.input.layout == "NHWC" else shape[1]
    if m.input.layout == "other" or channels != 3 or tuple(hw) != tuple(prep.size):
        return None
    return prep.size


def sample_inputs(
    manifest: Manifest,
    n: int = DEFAULT_SAMPLES,
    *,
    seed: int = 0,
    photos: Sequence[tuple[str, Path]] | None = None,
) -> SampleSet:
    """``n`` deterministic inputs for ``manifest``'s model.

    For an image model with real weights: each shipped photo once as it is, then augmented
    copies of them in turn (:func:`augment`), with a quarter of the set synthetic structured
    images (:func:`synthetic_image`); all through the package's preprocessing.

    A model that takes something else, and one with *seeded* weights, gets reproducible uniform
    inputs in [-1, 1]: seeded weights had their batch-norm statistics measured on exactly such
    inputs, and pictures through a real preprocessing (ResNet-50's mean subtraction leaves
    values of ±128) saturate their softmax to one class for every picture, where any form
    "agrees" without meaning anything (measured: 100 %, relative error 0.0).
    """
    if n < 1:
        raise ValueError("a sample set needs at least one input")
    geometry = _image_geometry(manifest)
    inputs: list[Array] = []
    if geometry is None or manifest.weights == "seeded":
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            inputs.append(rng.uniform(-1.0, 1.0, manifest.input.shape).astype(manifest.input.dtype))
        why = "seeded weights" if geometry is not None else "not an image model"
        what = f"{n} uniform random inputs in [-1, 1] ({why}; seed {seed})"
    else:
        assert manifest.preprocessing is not None
        prep, layout = manifest.preprocessing, manifest.input.layout
        loaded = _load_photos(shipped_photos() if photos is None else photos)
        n_synth = n if not loaded else n // 4
        n_photo = n - n_synth
        for i in range(n_photo):
            img = loaded[i % len(loaded)][1]
            if i >= len(loaded):  # the first pass is the photos as they are
                img = augment(img, np.random.default_rng([seed, i]))
            inputs.append(image_to_input(img, prep, layout))
        for j in range(n_synth):
            rng = np.random.default_rng([seed, 1_000_000 + j])
            side = (max(geometry[0], 256), max(geometry[1], 256))
            inputs.append(image_to_input(synthetic_image(j, side, rng), prep, layout))
        sources = sorted({s for s, _ in loaded})
        what = (
            f"{n} images: {len(loaded)} shipped photos ({', '.join(sources) or 'none'}) and "
            f"{n_photo - min(n_photo, len(loaded))} augmented crops of them, {n_synth} synthetic "
            f"(seed {seed})"
        )
    h = hashlib.sha256()
    for x in inputs:
        h.update(np.ascontiguousarray(x).tobytes())
    return SampleSet(tuple(inputs), f"{what}; sha256 {h.hexdigest()[:16]}")


# agreement (pure) --------------------------------------------------------------------------
def measure_agreement(
    reference: Sequence[Array],
    outputs: Sequence[Array],
    *,
    sample_set: str,
    threshold: float = AGREEMENT_THRESHOLD,
) -> Agreement:
    """Top-1 agreement (same argmax of the flattened output) and the worst relative error of
    ``outputs`` against ``reference``, sample by sample."""
    if len(reference) != len(outputs) or not reference:
        raise ValueError("agreement needs as many outputs as reference outputs, at least one")
    same = sum(
        int(np.argmax(np.asarray(o).reshape(-1)) == np.argmax(np.asarray(r).reshape(-1)))
        for r, o in zip(reference, outputs, strict=True)
    )
    worst = max(
        rel_error(np.asarray(o), np.asarray(r)) for r, o in zip(reference, outputs, strict=True)
    )
    return Agreement(
        top1=same / len(reference),
        samples=len(reference),
        max_rel_error=worst,
        sample_set=sample_set,
        threshold=threshold,
        distinct_top1=len({int(np.argmax(np.asarray(r).reshape(-1))) for r in reference}),
    )


def chain_outputs(
    blocks: Sequence[BlockFile], inputs: Sequence[Array], threads: int = 1
) -> list[Array]:
    """Each input through the whole ONNX chain (ONNX Runtime, as the edge runs it)."""
    from iotoffload.runtime.onnx import OnnxExecutor

    try:
        ex = OnnxExecutor(blocks, threads=threads)
        return [ex.run(0, len(blocks), x) for x in inputs]
    except ModelError:
        raise
    except Exception as e:  # ONNX Runtime's own errors: a block it cannot load or run
        raise BuildError(f"the ONNX chain does not run: {type(e).__name__}: {e}") from e


def package_blocks(pkg: ModelPackage) -> list[BlockFile]:
    return [BlockFile(pkg.onnx_path(b.index), b.input, b.output) for b in pkg.blocks]


# deriving a variant ------------------------------------------------------------------------
Converter = Callable[[bytes, UploadWeights], tuple[bytes, ConversionReport]]


def _default_converter(data: bytes, form: UploadWeights) -> tuple[bytes, ConversionReport]:
    return convert_onnx_bytes(data, form)


def _link_or_copy(src: Path, dst: Path) -> None:
    # a hard link costs no space; packages are replaced by renaming whole directories, never
    # rewritten in place, so a shared inode cannot change under the other package
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _move_into_place(staging: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    staging.rename(dest)


@dataclass
class VariantTimes:
    convert_s: float = 0.0
    agreement_s: float = 0.0
    verify_s: float = 0.0


@dataclass
class Reference:
    """The float32 package's outputs on a sample set, computed once for every form tried."""

    samples: SampleSet
    outputs: list[Array] = field(default_factory=list)

    @classmethod
    def of(cls, base: ModelPackage, samples: SampleSet, threads: int = 1) -> Reference:
        return cls(samples, chain_outputs(package_blocks(base), samples.inputs, threads))


def derive_variant(
    base: ModelPackage,
    form: UploadWeights,
    dest: Path,
    *,
    reference: Reference | None = None,
    threshold: float = AGREEMENT_THRESHOLD,
    threads: int = 1,
    converter: Converter = _default_converter,
    progress: Progress | None = None,
    times: VariantTimes | None = None,
) -> ModelPackage:
    """Build ``base``'s ``form`` variant at ``dest``: the same TFLite blocks (the device runs
    what it ran), converted ONNX blocks, new digests and model id, and the measured agreement.

    Raises AgreementError (nothing written at ``dest``) when the top-1 agreement with ``base``
    over the sample set is below ``threshold``; VerificationError when a split is off by more
    than the form's tolerance.
    """
    import time

    progress = progress or SilentProgress()
    times = times if times is not None else VariantTimes()
    m = base.manifest
    if form == "float32":
        raise ValueError("the float32 form is the package itself, not a variant")
    if m.upload_weights != "float32":
        raise BuildError(
            f"{base.root}: a variant is derived from a float32 package, this one is "
            f"{m.upload_weights}"
        )
    if reference is None:
        progress.info(f"{m.name}: float32 outputs on {DEFAULT_SAMPLES} sample inputs")
        reference = Reference.of(base, sample_inputs(m), threads)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    try:
        t0 = time.perf_counter()
        progress.start(m.num_blocks, f"converting ONNX blocks to {form} weights")
        blocks = []
        for b in m.blocks:
            data, _ = converter(base.onnx_path(b.index).read_bytes(), form)
            (staging / b.onnx).write_bytes(data)
            _link_or_copy(base.tflite_path(b.index), staging / b.tflite)
            blocks.append(
                b.model_copy(
                    update={
                        "onnx_sha256": sha256_file(staging / b.onnx),
                        "onnx_bytes": len(data),
                        "param_bytes": _param_bytes(data),
                    }
                )
            )
            progress.advance(f"block {b.index}")
        blocks = encode_blocks(staging, blocks, progress)
        if (base.root / REFERENCE_NAME).is_file():
            _link_or_copy(base.root / REFERENCE_NAME, staging / REFERENCE_NAME)
        times.convert_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        progress.info(f"measuring top-1 agreement over {len(reference.samples)} samples")
        files = [BlockFile(staging / b.onnx, b.input, b.output) for b in blocks]
        outputs = chain_outputs(files, reference.samples.inputs, threads)
        agreement = measure_agreement(
            reference.outputs,
            outputs,
            sample_set=reference.samples.description,
            threshold=threshold,
        )
        times.agreement_s = time.perf_counter() - t0
        if agreement.top1 < threshold:
            raise AgreementError(m.name, form, agreement)

        raw = m.model_dump()
        raw.update(
            model_id=compute_model_id([b.onnx_sha256 for b in blocks]),
            blocks=[b.model_dump() for b in blocks],
            verification=None,
            upload_weights=form,
            derived_from=m.model_id,
            agreement=agreement.model_dump(),
        )
        manifest = _validated(raw)
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        if (staging / REFERENCE_NAME).is_file():
            t0 = time.perf_counter()
            note = m.verification.reference if m.verification else "float32 reference"
            progress.info(f"verifying {m.num_blocks + 1} split points against the {note}")
            ver = verify_package(
                ModelPackage.load(staging),
                tolerance=tolerance_for(form),
                reference_note=f"{note} (float32 weights)",
            )
            times.verify_s = time.perf_counter() - t0
            manifest = manifest.model_copy(update={"verification": ver})
            (staging / MANIFEST_NAME).write_text(manifest.to_json())
        _move_into_place(staging, dest)
        return ModelPackage.load(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _validated(raw: dict[str, Any]) -> Manifest:
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:  # pragma: no cover - built from a manifest that validated
        raise BuildError(f"the variant's manifest is invalid:\n{e}") from e


def _param_bytes(data: bytes) -> int:
    """Bytes of the block's stored initializers: what its weights cost in the upload."""
    import onnx
    from onnx import helper

    g = onnx.load_model_from_string(data).graph
    return int(
        sum(
            math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            for t in g.initializer
        )
    )


# choosing a form ---------------------------------------------------------------------------
class Refusal(BaseModel):
    """A form refused for one float32 package, kept beside where its variant would be so that
    ``auto`` does not measure it again on every resolve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    derived_from: str = Field(pattern=r"^[0-9a-f]{64}$")
    form: UploadWeights
    agreement: Agreement


def variant_dir(base_root: Path, form: UploadWeights) -> Path:
    """Where ``base_root``'s ``form`` variant lives: ``<dir>@<form>`` beside it."""
    return base_root if form == "float32" else base_root.with_name(f"{base_root.name}@{form}")


def refusal_path(base_root: Path, form: UploadWeights) -> Path:
    return base_root.with_name(f"{base_root.name}@{form}.refused.json")


def read_refusal(base: ModelPackage, form: UploadWeights) -> Refusal | None:
    """The recorded refusal of ``form`` for this very base, if any (it holds the measured
    agreement: whether that is below a threshold is the caller's to judge)."""
    path = refusal_path(base.root, form)
    try:
        r = Refusal.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None  # unreadable or absent: measure again
    return r if r.derived_from == base.manifest.model_id else None


def load_variant(base: ModelPackage, form: UploadWeights) -> ModelPackage | None:
    """``base``'s ``form`` variant when one is there, intact and derived from this very base."""
    try:
        v = ModelPackage.load(variant_dir(base.root, form))
    except ModelError:
        return None
    m = v.manifest
    if m.upload_weights != form or m.derived_from != base.manifest.model_id:
        return None  # a variant of an earlier build of the base: stale
    return v


@dataclass(frozen=True)
class FormChoice:
    package: ModelPackage
    form: UploadWeights
    reason: str


def _held(a: Agreement) -> str:
    return f"top-1 agreement {a.top1 * 100:.1f} % over {a.samples} samples"


def _reason(form: UploadWeights, a: Agreement, passed_over: Sequence[str]) -> str:
    why = f"{form}: {_held(a)} (at least {a.threshold * 100:g} %)"
    return "; ".join([why, *passed_over])


def choose_form(
    base: ModelPackage,
    choice: UploadChoice,
    *,
    build: bool = True,
    force: bool = False,
    threshold: float = AGREEMENT_THRESHOLD,
    samples: int = DEFAULT_SAMPLES,
    threads: int = 1,
    progress: Progress | None = None,
) -> FormChoice:
    """The package to upload for ``choice``, deriving (``build``) or reusing variants.

    ``auto`` takes int8 if it holds the threshold, else float16, else float32. An explicit
    form that does not hold raises AgreementError. What a form measured is kept, in its
    variant or, refused, in a record beside it, so it is not measured again for the same base
    (``force`` measures again); a variant accepted at a lower threshold is judged by the one
    asked for now.
    """
    progress = progress or SilentProgress()
    if choice not in UPLOAD_CHOICES:
        raise ModelError(f"upload weights must be one of {', '.join(UPLOAD_CHOICES)}")
    if base.manifest.upload_weights != "float32":
        raise ModelError(
            f"{base.root} holds {base.manifest.upload_weights} weights: name its float32 package"
        )
    if choice == "float32":
        return FormChoice(base, "float32", "float32 asked for")
    forms: tuple[UploadWeights, ...] = AUTO_ORDER if choice == "auto" else (choice,)
    name = base.manifest.name
    passed_over: list[str] = []
    ref: Reference | None = None
    for form in forms:
        # what is known of this form for this very base: its variant, or a recorded refusal
        have = None if force else load_variant(base, form)
        measured = have.manifest.agreement if have is not None else None
        if measured is None and not force:
            rec = read_refusal(base, form)
            measured = rec.agreement if rec is not None else None
        if have is not None and measured is not None and measured.top1 >= threshold:
            return FormChoice(have, form, _reason(form, measured, passed_over))
        if measured is not None and measured.top1 < threshold:
            # the same samples give the same figure: no need to measure again
            refused = measured.model_copy(update={"threshold": threshold})
        else:
            if not build:
                raise ModelError(
                    f"the {form} upload weights of {name!r} are not prepared yet: iotoffload "
                    f"model prepare {name} --upload-weights {choice}"
                )
            if ref is None:
                progress.info(f"{name}: float32 outputs on {samples} sample inputs")
                ref = Reference.of(base, sample_inputs(base.manifest, samples), threads)
            try:
                v = derive_variant(
                    base,
                    form,
                    variant_dir(base.root, form),
                    reference=ref,
                    threshold=threshold,
                    threads=threads,
                    progress=progress,
                )
            except AgreementError as e:
                rec = Refusal(derived_from=base.manifest.model_id, form=form, agreement=e.agreement)
                _write_refusal(refusal_path(base.root, form), rec)
                refused = e.agreement
            else:
                refusal_path(base.root, form).unlink(missing_ok=True)
                assert v.manifest.agreement is not None
                return FormChoice(v, form, _reason(form, v.manifest.agreement, passed_over))
        if choice != "auto":
            raise AgreementError(name, form, refused)
        passed_over.append(f"{form} refused ({_held(refused)})")
        progress.info(f"{name}: {passed_over[-1]}, below {threshold * 100:g} %")
    return FormChoice(base, "float32", "float32: " + "; ".join(passed_over))


def _write_refusal(path: Path, rec: Refusal) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(rec.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
