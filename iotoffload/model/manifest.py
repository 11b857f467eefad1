"""The model package manifest (``manifest.json``): the schema other tools read.

A package is a DNN cut into a chain of blocks ``b0 … b(N-1)``; each block exists as ``.tflite``
(run by the device) and ``.onnx`` (uploaded to and run by the edge), both taking and returning
the same tensor so a boundary tensor passes between the runtimes unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from iotoffload.ids import ID_PATTERN
from iotoffload.model.errors import PackageError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

DType = Literal["float32", "float16", "int8", "uint8", "int32", "int64"]
Weights = Literal["imagenet", "seeded", "file", "user"]

_DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "int8": 1,
    "uint8": 1,
    "int32": 4,
    "int64": 8,
}


def dtype_size(dtype: str) -> int:
    return _DTYPE_SIZES[dtype]


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = _DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A tensor crossing a block boundary (static shape, batch included)."""

    name: str
    shape: tuple[int, ...] = Field(min_length=1)
    dtype: DType = "float32"

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @model_validator(mode="after")
    def _positive_dims(self) -> TensorSpec:
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: every dimension must be > 0: {self.shape}")
        return self


class InputSpec(_Strict):
    shape: tuple[int, ...] = Field(min_length=1)
    dtype: DType = "float32"
    layout: Literal["NHWC", "NCHW", "other"] = "NHWC"


class Preprocessing(_Strict):
    """How an image becomes the model's input: crop, resize, ``(pixel - mean) / std``."""

    size: tuple[int, int] = (224, 224)
    crop_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    resample: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)


class BlockSpec(_Strict):
    index: int = Field(ge=0)
    tflite: str
    onnx: str
    tflite_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: TensorSpec
    output: TensorSpec
    output_bytes: int = Field(ge=0)
    param_bytes: int = Field(ge=0, description="bytes of weights in the ONNX block")
    onnx_bytes: int = Field(ge=0, description="size of the .onnx file: what an upload sends")
    flops: int = Field(ge=0, description="estimated floating-point operations per query")


class Verification(_Strict):
    """What the post-build check measured: the worst split against the whole model."""

    max_rel_error: float
    worst_split: int
    tolerance: float
    reference: str = Field(description="what the mixed chains were compared with")


class Manifest(_Strict):
    format: int = FORMAT_VERSION
    name: str = Field(pattern=ID_PATTERN)
    model_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights: Weights
    weights_detail: str | None = None
    source: str = Field(description="where the package came from, e.g. keras:MobileNetV2")
    input: InputSpec
    preprocessing: Preprocessing | None = None
    labels: list[str] | None = None
    blocks: list[BlockSpec] = Field(min_length=1)
    verification: Verification | None = None

    @model_validator(mode="after")
    def _chain_is_consistent(self) -> Manifest:
        if self.format != FORMAT_VERSION:
            raise ValueError(
                f"manifest format {self.format} is not supported (this version reads "
                f"{FORMAT_VERSION}); re-prepare the package"
            )
        for i, b in enumerate(self.blocks):
            if b.index != i:
                raise ValueError(f"blocks[{i}] has index {b.index}: blocks must be in chain order")
            if b.output_bytes != b.output.nbytes:
                raise ValueError(f"block {i}: output_bytes {b.output_bytes} != output tensor size")
            if i and (self.blocks[i - 1].output.shape, self.blocks[i - 1].output.dtype) != (
                b.input.shape,
                b.input.dtype,
            ):
                raise ValueError(
                    f"block {i} input {b.input.shape} does not match block {i - 1} output "
                    f"{self.blocks[i - 1].output.shape}"
                )
        first = self.blocks[0].input
        if (first.shape, first.dtype) != (self.input.shape, self.input.dtype):
            raise ValueError("block 0 input does not match the model input")
        if self.model_id != compute_model_id([b.onnx_sha256 for b in self.blocks]):
            raise ValueError("model_id does not match the blocks' ONNX digests")
        return self

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, origin: str = MANIFEST_NAME) -> Manifest:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{origin}: not valid JSON: {e}") from e
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise PackageError(f"{origin}: invalid manifest:\n{e}") from e


def compute_model_id(onnx_digests: Sequence[str]) -> str:
    """The model id: sha256 over the ordered ONNX block digests.

    Only ONNX digests count, so an edge, which receives only ONNX blocks, can recompute it.
    """
    h = hashlib.sha256(b"iotoffload-model-v1\n")
    for d in onnx_digests:
        h.update(d.encode("ascii") + b"\n")
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
