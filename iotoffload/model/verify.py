"""Post-build check: every split k gives the whole model's output.

For k = 0..N the device runs TFLite blocks [0, k) and the edge ONNX Runtime blocks [k, N); the
result must equal the reference output within a relative tolerance (max abs difference divided
by the reference's max abs value).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iotoffload.model.errors import PackageError, VerificationError
from iotoffload.model.manifest import Verification
from iotoffload.model.package import ModelPackage
from iotoffload.runtime.base import Array
from iotoffload.runtime.onnx import OnnxExecutor
from iotoffload.runtime.tflite import TFLiteExecutor

DEFAULT_TOLERANCE = 1e-4
REFERENCE_NAME = "reference.npz"


def rel_error(a: Array, ref: Array) -> float:
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(a.astype(np.float64) - ref.astype(np.float64)))) / scale


@dataclass(frozen=True)
class SplitReport:
    errors: list[float]  # errors[k]: TFLite [0,k) + ORT [k,N) against the reference

    @property
    def worst_split(self) -> int:
        return int(np.argmax(self.errors))

    @property
    def max_error(self) -> float:
        return max(self.errors)


def split_errors(tfl: TFLiteExecutor, ort: OnnxExecutor, x: Array, reference: Array) -> SplitReport:
    n = tfl.num_blocks
    prefixes = [x]
    for i in range(n):  # TFLite outputs after 0..N blocks, computed once
        prefixes.append(tfl.run(i, i + 1, prefixes[-1]))
    return SplitReport([rel_error(ort.run(k, n, prefixes[k]), reference) for k in range(n + 1)])


def load_reference(root: Path) -> tuple[Array, Array]:
    path = root / REFERENCE_NAME
    if not path.is_file():
        raise PackageError(f"{path}: no reference input/output in this package")
    with np.load(path) as z:
        return np.asarray(z["input"]), np.asarray(z["output"])


def verify_package(
    pkg: ModelPackage,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    reference_note: str = "whole model",
    **executor_kw: Any,
) -> Verification:
    """Check every split of ``pkg`` against its reference; raise VerificationError if off."""
    x, ref = load_reference(pkg.root)
    tfl = TFLiteExecutor.from_package(pkg, **executor_kw.get("tflite", {}))
    ort = OnnxExecutor.from_package(pkg, **executor_kw.get("onnx", {}))
    report = split_errors(tfl, ort, x, ref)
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
    )
