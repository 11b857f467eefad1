"""A package from an ONNX model alone: fold constants, cut at single-tensor points, wrap every
block so it speaks NHWC, and convert each block to TFLite with onnx2tf (one subprocess per
block: one long process gets slower with each block)."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from iotoffload.model.cuts import CutPolicy, select_cuts, single_tensor_cuts
from iotoffload.model.errors import BuildError, CutError, MissingDependencyError
from iotoffload.model.manifest import Preprocessing, Weights
from iotoffload.model.onnx_fold import fold_constants
from iotoffload.model.onnx_graph import (
    extract_block,
    infer,
    onnx_op_graph,
    rename_io,
    value_shapes,
)
from iotoffload.model.package import ModelPackage
from iotoffload.model.progress import Progress, SilentProgress
from iotoffload.model.verify import DEFAULT_TOLERANCE

NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)
# onnx2tf downloads a calibration sample for 4-D 3-channel inputs unless one is there.
CALIBRATION = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _onnx2tf_cmd() -> list[str]:
    for mod in ("onnx2tf", "tf_keras", "onnx_graphsurgeon", "sng4onnx", "tensorflow"):
        if importlib.util.find_spec(mod) is None:
            raise MissingDependencyError(
                f"converting ONNX blocks to TFLite (missing {mod}; onnx2tf and tf-keras are "
                "installed with --no-deps: pip install --no-deps onnx2tf tf-keras)",
                "onnx",
            )
    exe = Path(sys.executable).parent / "onnx2tf"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "onnx2tf"]


def _layout_of(shape: tuple[int, ...]) -> str:
    return "NCHW" if len(shape) == 4 and shape[1] <= 4 < shape[2] else "NHWC"


def _to_tflite(onnx_path: Path, input_name: str, workdir: Path) -> bytes:
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(
        workdir / CALIBRATION,
        np.random.default_rng(0).uniform(0, 1, (20, 128, 128, 3)).astype(np.float32),
    )
    out = workdir / "out"
    proc = subprocess.run(
        [*_onnx2tf_cmd(), "-i", str(onnx_path), "-o", str(out), "-kt", input_name, "-n"],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    tfl = out / f"{onnx_path.stem}_float32.tflite"
    if proc.returncode != 0 or not tfl.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise BuildError(f"onnx2tf failed on {onnx_path.name}:\n{tail}")
    return tfl.read_bytes()


def cut_onnx(model: Any, policy: CutPolicy) -> tuple[list[str], str, str]:
    """(boundary tensor names, input layout, output name) of a folded, shape-inferred model."""
    g = onnx_op_graph(model)
    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise CutError("an ONNX model with one input and one output is required")
    cuts = select_cuts(g, single_tensor_cuts(g), policy)
    if not cuts:
        raise CutError("no single-tensor cut point found: the model is not a chain")
    shape = value_shapes(model)[g.inputs[0]]
    return [g.inputs[0], *(c.tensor for c in cuts), g.outputs[0]], _layout_of(shape), g.outputs[0]


def write_onnx_blocks(
    onnx_model: Any,
    staging: Path,
    *,
    policy: CutPolicy = "narrow",
    progress: Progress | None = None,
    workers: int = 2,
) -> int:
    """Cut, wrap and convert; writes bNN.onnx/bNN.tflite and reference.npz into ``staging``."""
    import onnx
    import onnxruntime as ort

    progress = progress or SilentProgress()
    model = infer(fold_constants(onnx_model))
    bounds, layout, _ = cut_onnx(model, policy)
    shapes = value_shapes(model)
    n = len(bounds) - 1

    def perm_in(t: str) -> tuple[int, ...] | None:
        return NHWC_TO_NCHW if layout == "NCHW" and len(shapes.get(t, ())) == 4 else None

    def perm_out(t: str) -> tuple[int, ...] | None:
        return NCHW_TO_NHWC if layout == "NCHW" and len(shapes.get(t, ())) == 4 else None

    for i in range(n):
        blk = extract_block(
            model,
            bounds[i],
            bounds[i + 1],
            input_perm=perm_in(bounds[i]),
            output_perm=perm_out(bounds[i + 1]),
            input_alias=f"b{i}_in",
            output_alias=f"b{i}_out",
        )
        # plain names on both ends: onnx2tf ignores input names containing '/'
        rename_io(blk, f"b{i}_in", f"b{i}_out")
        onnx.save(blk, str(staging / f"b{i:02d}.onnx"))
    progress.start(n, "converting blocks to TFLite (onnx2tf)")

    def convert(i: int) -> int:
        data = _to_tflite(staging / f"b{i:02d}.onnx", f"b{i}_in", staging / "_onnx2tf" / f"b{i}")
        (staging / f"b{i:02d}.tflite").write_bytes(data)
        return i

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for i in pool.map(convert, range(n)):
            progress.advance(f"block {i}")
    shutil.rmtree(staging / "_onnx2tf", ignore_errors=True)
    # reference: the whole (folded) ONNX model on a probe input given in NHWC
    in_shape = shapes[bounds[0]]
    ext_shape = tuple(in_shape[j] for j in NCHW_TO_NHWC) if layout == "NCHW" else in_shape
    x = np.random.default_rng(0).uniform(-1, 1, ext_shape).astype(np.float32)
    feed = np.ascontiguousarray(x.transpose(NHWC_TO_NCHW)) if layout == "NCHW" else x
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y = sess.run(None, {bounds[0]: feed})[0]
    if perm_out(bounds[-1]):
        y = y.transpose(NCHW_TO_NHWC)
    np.savez(staging / "reference.npz", input=x, output=np.ascontiguousarray(y))
    return n


def prepare_onnx(
    onnx_path: Path,
    name: str,
    dest: Path,
    *,
    policy: CutPolicy = "narrow",
    weights: Weights = "user",
    weights_detail: str | None = None,
    source: str | None = None,
    labels: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Progress | None = None,
) -> ModelPackage:
    """Build a package from an ONNX model alone (TFLite blocks through onnx2tf)."""
    import onnx

    from iotoffload.model.build import _finalize, _staging

    progress = progress or SilentProgress()
    _onnx2tf_cmd()
    try:
        model = onnx.load(str(onnx_path))
    except Exception as e:
        raise CutError(f"{onnx_path}: not a readable ONNX model: {e}") from e
    staging = _staging(dest, force)
    try:
        n = write_onnx_blocks(model, staging, policy=policy, progress=progress)
        return _finalize(
            staging,
            dest,
            num_blocks=n,
            name=name,
            weights=weights,
            weights_detail=weights_detail,
            source=source or f"onnx:{Path(onnx_path).name}",
            layout="NHWC",
            preprocessing=preprocessing,
            labels=labels,
            reference_note="whole ONNX model",
            tolerance=tolerance,
            progress=progress,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
