"""Bench helper: a device that uploads its model while sending queries at a fixed rate; one
JSON line per query on stdout (time since first contact, latency, where it ran), then a
summary line."""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from broker.secured import SecuredBroker
from device_agent.agent import DeviceAgent
from iotoffload.model.package import ModelPackage
from iotoffload.planning import Estimates
from iotoffload.runtime.profiling import measure_device_ms
from iotoffload.runtime.tflite import TFLiteExecutor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--broker", required=True)
    ap.add_argument("--edge", default="bench-edge")
    ap.add_argument("--package", type=Path, required=True)
    ap.add_argument("--planner", default="auto")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--after-upload", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--edge-speed", type=float, default=1.0)
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
    x = np.zeros(pkg.manifest.input.shape, np.float32)
    dev.tfl.run(0, pkg.num_blocks, x)  # warm
    t0 = time.perf_counter()
    dev.connect()
    done = threading.Event()
    upload_s: list[float] = []

    def upload() -> None:
        dev.upload()
        upload_s.append(time.perf_counter() - t0)
        done.set()

    if a.planner != "local":
        threading.Thread(target=upload, daemon=True).start()
    i = 0
    while True:
        now = time.perf_counter() - t0
        if now > a.duration or (upload_s and now > upload_s[0] + a.after_upload):
            break
        if a.planner == "local" and now > a.after_upload:
            break
        o = dev.query(x, i)
        print(
            json.dumps(
                {
                    "t": round(now, 4),
                    "latency_ms": round(o.latency_ms, 3),
                    "offloaded": o.offloaded,
                    "plan": o.plan,
                    "predicted_ms": round(o.predicted_ms, 3),
                }
            ),
            flush=True,
        )
        i += 1
        time.sleep(max(0.0, a.interval - o.latency_ms / 1e3))
    print(
        json.dumps(
            {
                "summary": True,
                "upload_s": upload_s[0] if upload_s else None,
                "bytes_uploaded": dev.bytes_uploaded,
                "device_ms": list(dev.inputs.profile.device_ms),
            }
        ),
        flush=True,
    )
    dev.close()


if __name__ == "__main__":
    main()
