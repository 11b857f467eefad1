"""The model package manifest (``manifest.json``): the schema other tools read.

A package is a DNN cut into a chain of blocks ``b0 … b(N-1)``; each block exists as ``.tflite``
(run by the device) and ``.onnx`` (uploaded to and run by the edge), both taking and returning
the same tensor so a boundary tensor passes between the runtimes unchanged.

A package's ONNX blocks hold their weights in one *upload form* (``upload_weights``): float32
(what every package built from a model has), or float16 / int8 weight-only in a variant derived
from a float32 package (``iotoffload.model.weights``), which records the float32 package it came
from and the top-1 agreement measured against it. The fields are optional and left out of a
float32 manifest's JSON, so a float32 manifest reads and writes exactly as before they existed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from iotoffload.ids import ID_PATTERN
from iotoffload.model.block_codec import ENCODINGS, Encoding
from iotoffload.model.errors import PackageError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

DType = Literal["float32", "float16", "int8", "uint8", "int32", "int64"]
Weights = Literal["imagenet", "seeded", "file", "user"]
# How the ONNX blocks store their large float weights (what a device uploads); the edge computes
# in float32 whatever the form (ONNX Runtime folds the casts into float32 weights at load)
UploadWeights = Literal["float32", "float16", "int8"]
UPLOAD_FORMS: tuple[UploadWeights, ...] = ("float32", "float16", "int8")

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


class BlockUpload(_Strict):
    """The file an upload of the block sends when it is not the .onnx itself: the .onnx
    losslessly encoded (``block_codec``), which the edge decodes and checks against
    ``onnx_sha256``."""

    encoding: Encoding
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)

    @model_validator(mode="after")
    def _encoded(self) -> BlockUpload:
        if self.encoding == "identity":
            raise ValueError(f"an upload file has an encoding (one of {ENCODINGS[1:]})")
        return self


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
    onnx_bytes: int = Field(ge=0, description="size of the .onnx file")
    flops: int = Field(ge=0, description="estimated floating-point operations per query")
    upload: BlockUpload | None = None  # None: an upload sends the .onnx file as it is

    @property
    def upload_bytes(self) -> int:
        """What an upload of the block sends."""
        return self.upload.bytes if self.upload is not None else self.onnx_bytes

    @property
    def encoding(self) -> Encoding:
        return self.upload.encoding if self.upload is not None else "identity"


class Verification(_Strict):
    """What the post-build check measured: the worst split against the whole model."""

    max_rel_error: float
    worst_split: int
    tolerance: float
    reference: str = Field(description="what the mixed chains were compared with")
    # float16/int8 variants only: each ONNX block against its TFLite twin (verify.py says why)
    block_max_rel_error: float | None = None
    worst_block: int | None = Field(default=None, ge=0)
    block_tolerance: float | None = None


class Agreement(_Strict):
    """How a variant's outputs compare with its float32 package's over a sample set: the whole
    ONNX chain of each (every block converted: the most a device can hand to the edge)."""

    top1: float = Field(ge=0.0, le=1.0, description="fraction of samples with the same argmax")
    samples: int = Field(ge=1, description="N, the number of sample inputs")
    max_rel_error: float = Field(ge=0.0, description="worst max|y - y32| / max|y32| of a sample")
    sample_set: str = Field(description="what the samples were, with their sha256")
    threshold: float = Field(ge=0.0, le=1.0, description="the least top1 the build accepted")
    distinct_top1: int | None = Field(
        default=None,
        ge=1,
        description="how many different float32 top-1 classes the samples have (few: the "
        "agreement says little)",
    )


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
    upload_weights: UploadWeights = "float32"
    derived_from: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="model_id of the float32 package a variant was derived from",
    )
    agreement: Agreement | None = None

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
        variant = self.upload_weights != "float32"
        if variant and (self.derived_from is None or self.agreement is None):
            raise ValueError(
                f"upload_weights {self.upload_weights!r} needs derived_from and agreement (a "
                "variant records the float32 package it came from and how well it agrees)"
            )
        if not variant and (self.derived_from is not None or self.agreement is not None):
            raise ValueError("derived_from and agreement belong to float16/int8 variants only")
        return self

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def to_json(self) -> str:
        # a float32 manifest leaves the variant fields out: its JSON is what it was before they
        # existed, so older readers (extra fields are forbidden) still load it
        exclude: dict[str, Any] = {}
        if self.upload_weights == "float32":
            exclude = {
                "upload_weights": True,
                "derived_from": True,
                "agreement": True,
                "verification": {"block_max_rel_error", "worst_block", "block_tolerance"},
            }
        if all(b.upload is None for b in self.blocks):  # as before encoded uploads existed
            exclude["blocks"] = {"__all__": {"upload"}}
        return self.model_dump_json(indent=2, exclude=exclude or None) + "\n"

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
