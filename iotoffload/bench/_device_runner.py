"""Bench helper: a device that uploads its model while sending queries at a fixed rate; one
JSON line per query on stdout (time since first contact, latency, where it ran, its TFLite CPU,
its wait behind upload chunks), then a summary line (the upload's end and bytes, and the
process CPU the upload cost).

The run lasts ``max(horizon, upload end + after_upload)`` seconds from first contact, at most
``duration`` (``local`` uploads nothing: ``horizon``). ``--no-queries``: upload only.

CPU accounting: ``time.process_time()`` (every thread of this process, user + system) from the
upload's start to its end; imports, profiling and the warm-up come before and are not in it.
TFLite runs on the query thread (one interpreter thread), and its CPU is measured around each
call with that thread's CPU clock, so it can be taken out: under the cgroup quota a wall-clock
figure (``front_ms``) would also count the time the device was throttled.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from broker.secured import SecuredBroker
from device_agent.agent import DeviceAgent
from iotoffload.model.package import ModelPackage
from iotoffload.planning import Estimates
from iotoffload.runtime.base import Array
from iotoffload.runtime.profiling import measure_device_ms
from iotoffload.runtime.tflite import TFLiteExecutor


class TFLiteClock:
    """CPU seconds TFLite spent on the query thread: wraps the executor's ``run_timed`` (its
    ``run`` goes through it), on this one instance."""

    def __init__(self, tfl: TFLiteExecutor) -> None:
        self.cpu_s = 0.0  # written by the query thread only; read by others (a float swap)
        inner: Callable[[int, int, Array], tuple[Array, list[float]]] = tfl.run_timed

        def run_timed(start: int, end: int, x: Array) -> tuple[Array, list[float]]:
            c0 = time.thread_time()
            try:
                return inner(start, end, x)
            finally:
                self.cpu_s += time.thread_time() - c0

        tfl.run_timed = run_timed  # type: ignore[method-assign]


def bench_input(pkg: ModelPackage, form: str) -> Array:
    """The bench's query input: a frame of uint8 pixels (random, fixed), as a camera gives
    it, for a model with image preprocessing; else (or ``float32``) the float32 input."""
    shape = pkg.manifest.input.shape
    if form == "pixels" and pkg.manifest.preprocessing is not None:
        return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    return np.zeros(shape, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--broker", required=True)
    ap.add_argument("--edge", default="bench-edge")
    ap.add_argument("--package", type=Path, required=True)
    ap.add_argument("--planner", default="auto")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--horizon", type=float, default=0.0, help="shortest run, s")
    ap.add_argument("--duration", type=float, default=30.0, help="longest run, s")
    ap.add_argument("--after-upload", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--edge-speed", type=float, default=1.0)
    ap.add_argument("--no-queries", action="store_true", help="upload only")
    ap.add_argument(
        "--input",
        choices=["pixels", "float32"],
        default="pixels",
        help="queries of a camera's uint8 frame (the model's preprocessing normalises it "
        "where block 0 runs) or of the float32 input itself",
    )
    ap.add_argument("--lab", type=Path, default=None, help="secured: the setup's directory")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    pkg = ModelPackage.load(a.package)
    est = Estimates(bandwidth_Bps=a.rate_mbit * 1e6 / 8, rtt_ms=2.0)
    # this process runs under the testbed's CPU quota: measure, but do not cache, its profile
    tfl = TFLiteExecutor.from_package(pkg)
    d = measure_device_ms(pkg, tfl, cache=False)
    # the edge's speed relative to this (CPU-limited) device, as IONN's profiled server
    # model; the edge's own block times replace it block by block as they are uploaded
    dev = DeviceAgent(
        pkg,
        a.broker,
        a.edge,
        protocol=311,
        planner=a.planner,
        estimates=est,
        device_ms=d,
        edge_speed=a.edge_speed,
        # on the secured setup: its own identity, through the ACL
        device_id="bench-device" if a.lab else None,
        security=SecuredBroker(a.broker, a.lab).security("bench-device") if a.lab else None,
    )
    x = bench_input(pkg, a.input)
    dev.tfl.run(0, pkg.num_blocks, np.zeros(pkg.manifest.input.shape, np.float32))  # warm
    clock = TFLiteClock(dev.tfl)
    main_ident = threading.main_thread().ident
    assert main_ident is not None
    query_thread = time.pthread_getcpuclockid(main_ident)  # read from the upload thread
    t0 = time.perf_counter()
    dev.connect()
    done = threading.Event()
    up: dict[str, Any] = {}

    def upload() -> None:
        up["start_s"] = time.perf_counter() - t0
        cpu0, tfl0 = time.process_time(), clock.cpu_s
        q0 = time.clock_gettime(query_thread)
        try:
            dev.upload()
        except Exception as e:  # reported in the summary line; the run goes on
            up["error"] = f"{type(e).__name__}: {e}"
        else:
            up["end_s"] = time.perf_counter() - t0
            up["cpu_s"] = time.process_time() - cpu0
            up["tflite_cpu_s"] = clock.cpu_s - tfl0
            up["query_thread_cpu_s"] = time.clock_gettime(query_thread) - q0
        finally:
            done.set()

    uploads = a.planner != "local" or a.no_queries
    if uploads:
        threading.Thread(target=upload, daemon=True).start()
    else:
        done.set()
    if a.no_queries:
        done.wait(a.duration)
    else:
        _query(dev, x, clock, t0, a, uploads, up)
    print(
        json.dumps(
            {
                "summary": True,
                "upload_start_s": up.get("start_s"),
                "upload_s": up.get("end_s"),
                "upload_error": up.get("error"),
                "query_input": "pixels" if x.dtype == np.uint8 else "float32",
                "bytes_uploaded": dev.bytes_uploaded,
                "upload_cpu_s": up.get("cpu_s"),
                "upload_tflite_cpu_s": up.get("tflite_cpu_s"),
                "upload_query_thread_cpu_s": up.get("query_thread_cpu_s"),
                "run_s": up.get("run_s", up.get("end_s")),
                "device_ms": list(dev.inputs.profile.device_ms),
            }
        ),
        flush=True,
    )
    dev.close()


def _query(
    dev: DeviceAgent,
    x: Array,
    clock: TFLiteClock,
    t0: float,
    a: argparse.Namespace,
    uploads: bool,
    up: dict[str, Any],
) -> None:
    """Query every ``interval`` until the run's end: past the horizon and ``after_upload``
    past the upload's end (none for ``local``), or at ``duration``."""
    i = 0
    last = 0.0
    while True:
        now = time.perf_counter() - t0
        end = up.get("end_s")
        settled = not uploads or (end is not None and now >= end + a.after_upload)
        if now >= a.duration or (now >= a.horizon and settled):
            break
        c0, tfl0 = time.thread_time(), clock.cpu_s
        o = dev.query(x, i)
        rec: dict[str, Any] = {
            "t": round(now, 4),
            "latency_ms": round(o.latency_ms, 3),
            "offloaded": o.offloaded,
            "reason": o.reason,
            "plan": o.plan,
            "predicted_ms": round(o.predicted_ms, 3),
            "front_ms": round(o.front_ms, 3),
            "tflite_cpu_ms": round((clock.cpu_s - tfl0) * 1e3, 3),
            "query_cpu_ms": round((time.thread_time() - c0) * 1e3, 3),
        }
        if o.offloaded:  # the query's own bytes on the link the upload shares
            rec["wire_bytes"] = o.wire_bytes
        if hasattr(o, "behind_upload_ms"):  # a device agent from before the field: no key
            b = o.behind_upload_ms
            rec["behind_upload_ms"] = None if b is None else round(b, 3)
        print(json.dumps(rec), flush=True)
        last = now
        i += 1
        time.sleep(max(0.0, a.interval - o.latency_ms / 1e3))
    up["run_s"] = last


if __name__ == "__main__":
    main()
