"""Per-block latency of a model package: TFLite (device runtime) vs ONNX Runtime (edge runtime).

Runs both runtimes on the same machine, interleaved block by block so that drift from a shared,
noisy machine hits both alike; reports medians and the TFLite/ORT ratio of each block.

    python benchmarks/block_times.py mobilenet --threads 1 --repeat 50 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from iotoffload.model.cache import ModelCache
from iotoffload.runtime import OnnxExecutor, TFLiteExecutor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="package name (cache) or directory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()

    pkg = ModelCache.from_settings().resolve(a.model)
    tfl = TFLiteExecutor.from_package(pkg, threads=a.threads)
    ort = OnnxExecutor.from_package(pkg, threads=a.threads)
    x = np.random.default_rng(0).uniform(-1, 1, pkg.manifest.input.shape).astype(np.float32)
    inputs = [x]
    for i in range(pkg.num_blocks):
        inputs.append(tfl.run(i, i + 1, inputs[-1]))
    rows = []
    for i in range(pkg.num_blocks):
        t_tfl, t_ort = [], []
        for r in range(a.warmup + a.repeat):
            t0 = time.perf_counter()
            tfl.run(i, i + 1, inputs[i])
            t1 = time.perf_counter()
            ort.run(i, i + 1, inputs[i])
            t2 = time.perf_counter()
            if r >= a.warmup:
                t_tfl.append((t1 - t0) * 1e3)
                t_ort.append((t2 - t1) * 1e3)
        rows.append(
            {
                "block": i,
                "tflite_ms": statistics.median(t_tfl),
                "ort_ms": statistics.median(t_ort),
            }
        )
    tot_t = sum(r["tflite_ms"] for r in rows)
    tot_o = sum(r["ort_ms"] for r in rows)
    print(f"{pkg.name}: {pkg.num_blocks} blocks, {a.threads} thread(s), TFLite/{tfl.backend}")
    print(f"{'block':>5} {'TFLite ms':>10} {'ORT ms':>10} {'TFLite/ORT':>11}")
    for r in rows:
        ratio = r["tflite_ms"] / r["ort_ms"]
        print(f"{r['block']:>5} {r['tflite_ms']:>10.3f} {r['ort_ms']:>10.3f} {ratio:>11.2f}")
    print(f"{'total':>5} {tot_t:>10.3f} {tot_o:>10.3f} {tot_t / tot_o:>11.2f}")
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "model": pkg.name,
                    "threads": a.threads,
                    "backend": tfl.backend,
                    "blocks": rows,
                    "total_tflite_ms": tot_t,
                    "total_ort_ms": tot_o,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
