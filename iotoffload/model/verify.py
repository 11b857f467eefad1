"""Post-build check: every split k gives the whole model's output.

For k = 0..N the device runs TFLite blocks [0, k) and the edge ONNX Runtime blocks [k, N); the
result must equal the reference output within a relative tolerance (max abs difference divided
by the reference's max abs value).

A float16 or int8 variant (``iotoffload.model.weights``) runs the same splits, its TFLite blocks
(float32, unchanged) then its converted ONNX blocks, against the same float32 reference. Its
weights' rounding is there by design and grows along the chain (with seeded weights an int8
chain ends up a few tenths off), so the split tolerance of a form (``tolerance_for``) is only a
backstop; the sharp check is per block: each converted ONNX block, fed the float32 TFLite
boundary tensor, must give the TFLite block's output within ``block_tolerance_for`` its form
(rounding of the weights alone: measured ≤ 1e-3 for float16 and ≤ 3e-2 for int8 on every block
of mobilenet, efficientnet-lite0 and ResNet-50, while a block converted wrong, a channel's scale
on the wrong axis or a cast lost, is off by the order of its output). Whether the rounding
changes predictions is what the variant's top-1 agreement, measured at build, says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from iotoffload.model.errors import PackageError, VerificationError
from iotoffload.model.manifest import UploadWeights, Verification
from iotoffload.model.package import ModelPackage

if TYPE_CHECKING:  # the runtimes import iotoffload.model: verify_package loads them
    from iotoffload.runtime.base import Array
    from iotoffload.runtime.onnx import OnnxExecutor
    from iotoffload.runtime.tflite import TFLiteExecutor

DEFAULT_TOLERANCE = 1e-4
REFERENCE_NAME = "reference.npz"
# the worst split's relative error a form may show (a backstop for variants: see above)
FORM_TOLERANCES: dict[UploadWeights, float] = {
    "float32": DEFAULT_TOLERANCE,
    "float16": 1e-1,
    "int8": 5e-1,
}
# the worst single block's relative error a form may show (the sharp check for variants)
BLOCK_TOLERANCES: dict[UploadWeights, float] = {
    "float32": DEFAULT_TOLERANCE,
    "float16": 5e-3,
    "int8": 6e-2,
}


def tolerance_for(form: UploadWeights) -> float:
    return FORM_TOLERANCES[form]


def block_tolerance_for(form: UploadWeights) -> float:
    return BLOCK_TOLERANCES[form]


def rel_error(a: Array, ref: Array) -> float:
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(a.astype(np.float64) - ref.astype(np.float64)))) / scale


@dataclass(frozen=True)
class SplitReport:
    errors: list[float]  # errors[k]: TFLite [0,k) + ORT [k,N) against the reference
    # block_errors[i]: ORT block i on TFLite's boundary tensor i against TFLite's tensor i+1
    block_errors: list[float] | None = None

    @property
    def worst_split(self) -> int:
        return int(np.argmax(self.errors))

    @property
    def max_error(self) -> float:
        return max(self.errors)

    @property
    def worst_block(self) -> int:
        return int(np.argmax(self.block_errors)) if self.block_errors else 0

    @property
    def max_block_error(self) -> float:
        return max(self.block_errors) if self.block_errors else 0.0


def split_errors(
    tfl: TFLiteExecutor, ort: OnnxExecutor, x: Array, reference: Array, *, blocks: bool = False
) -> SplitReport:
    n = tfl.num_blocks
    prefixes = [x]
    for i in range(n):  # TFLite outputs after 0..N blocks, computed once
        prefixes.append(tfl.run(i, i + 1, prefixes[-1]))
    errors = [rel_error(ort.run(k, n, prefixes[k]), reference) for k in range(n + 1)]
    if not blocks:
        return SplitReport(errors)
    per_block = [rel_error(ort.run(i, i + 1, prefixes[i]), prefixes[i + 1]) for i in range(n)]
    return SplitReport(errors, per_block)


def load_reference(root: Path) -> tuple[Array, Array]:
    path = root / REFERENCE_NAME
    if not path.is_file():
        raise PackageError(f"{path}: no reference input/output in this package")
    with np.load(path) as z:
        return np.asarray(z["input"]), np.asarray(z["output"])


def verify_package(
    pkg: ModelPackage,
    *,
    tolerance: float | None = None,
    reference_note: str = "whole model",
    **executor_kw: Any,
) -> Verification:
    """Check every split of ``pkg`` against its reference; raise VerificationError if off.

    ``tolerance`` defaults to the package's upload form's (``tolerance_for``); a float16 or
    int8 variant also has every block checked against its TFLite twin (``block_tolerance_for``).
    """
    form = pkg.manifest.upload_weights
    if tolerance is None:
        tolerance = tolerance_for(form)
    variant = form != "float32"
    x, ref = load_reference(pkg.root)
    from iotoffload.runtime.onnx import OnnxExecutor
    from iotoffload.runtime.tflite import TFLiteExecutor

    tfl = TFLiteExecutor.from_package(pkg, **executor_kw.get("tflite", {}))
    ort = OnnxExecutor.from_package(pkg, **executor_kw.get("onnx", {}))
    report = split_errors(tfl, ort, x, ref, blocks=variant)
    block_tolerance = block_tolerance_for(form)
    if variant and report.max_block_error > block_tolerance:
        raise VerificationError(
            f"{pkg.name}: block {report.worst_block}'s {form} ONNX block differs from its TFLite "
            f"block by {report.max_block_error:.3g} relative (tolerance {block_tolerance:g} for "
            f"{form} weights): the block was converted wrong"
        )
    if report.max_error > tolerance:
        raise VerificationError(
            f"{pkg.name}: split k={report.worst_split} differs from the {reference_note} by "
            f"{report.max_error:.3g} relative (tolerance {tolerance:g})"
        )
    return Verification(
        max_rel_error=report.max_error,
        worst_split=report.worst_split,
        tolerance=tolerance,
        reference=reference_note,
        block_max_rel_error=report.max_block_error if variant else None,
        worst_block=report.worst_block if variant else None,
        block_tolerance=block_tolerance if variant else None,
    )
