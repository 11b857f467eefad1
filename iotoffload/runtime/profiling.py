"""Device profiling: per-block TFLite time on this device, measured once and cached on disk
(the planner gets the numbers; it never runs a model or reads a file itself)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np

from iotoffload.config import ModelSettings
from iotoffload.model.package import ModelPackage
from iotoffload.runtime.tflite import TFLiteExecutor


def profile_path(pkg: ModelPackage, tfl: TFLiteExecutor, cache_dir: Path | None = None) -> Path:
    root = (cache_dir or ModelSettings().cache_dir).parent / "profiles"
    key = f"{pkg.manifest.model_id[:16]}-{socket.gethostname()}-{tfl.backend}-t{tfl.threads}"
    return root / f"{key}.json"


def measure_device_ms(
    pkg: ModelPackage,
    tfl: TFLiteExecutor,
    *,
    runs: int = 5,
    cache_dir: Path | None = None,
    reprofile: bool = False,
    cache: bool = True,
) -> list[float]:
    """Median per-block TFLite time on this device over ``runs`` warm runs; cached per model,
    device and runtime settings so the next start is instant (``reprofile`` measures again;
    ``cache=False`` neither reads nor writes it: an emulated slow device must not leave its
    profile behind for the real one)."""
    path = profile_path(pkg, tfl, cache_dir)
    if cache and not reprofile and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if len(cached["device_ms"]) == pkg.num_blocks:
                return [float(v) for v in cached["device_ms"]]
        except (ValueError, KeyError, TypeError):
            pass
    x = np.zeros(pkg.manifest.input.shape, pkg.manifest.input.dtype)
    tfl.run(0, pkg.num_blocks, x)  # warm-up: interpreters allocated, caches hot
    samples = [tfl.run_timed(0, pkg.num_blocks, x)[1] for _ in range(runs)]
    ms = [float(v) * 1e3 for v in np.median(np.asarray(samples), axis=0)]
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model_id": pkg.manifest.model_id, "device_ms": ms}))
    return ms
