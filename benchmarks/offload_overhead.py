"""Offloading over a real broker on loopback: local-only vs offloaded latency per split, the
middleware's own overhead per query, and chunk upload throughput.

    python benchmarks/offload_overhead.py --broker mosquitto|embedded [--repeat 30] [--json F]

overhead = end-to-end − device front compute − edge execution − the bytes' time on the link,
where the bytes' time is (query frame + result frame) ÷ the broker's bulk throughput measured
in the same run (30 back-to-back 600 KB messages, publisher to subscriber). Loopback and one
shared machine: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker.embedded import EmbeddedBroker, free_port
from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model.cache import ModelCache
from iotoffload.transport.mqtt import MqttLink


def _mosquitto(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = tmp / "mosquitto.conf"
    shipped = (Path(__file__).parents[1] / "configs" / "mosquitto.conf").read_text()
    conf.write_text(shipped.replace("listener 1883 ", f"listener {port} "))
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"mqtt://127.0.0.1:{port}"


def link_throughput(url: str, protocol: int, size: int = 600_000, count: int = 30) -> float:
    """Bytes per second through the broker, publisher to subscriber, QoS 1."""
    got = threading.Event()
    seen = [0]

    def on_msg(_t: str, _p: bytes) -> None:
        seen[0] += 1
        if seen[0] == count:
            got.set()

    sub = MqttLink(url, "bench-sub", protocol=protocol)
    sub.subscribe("bench/bulk", on_msg)
    sub.connect()
    pub = MqttLink(url, "bench-pub", protocol=protocol)
    pub.connect()
    payload = b"x" * size
    t0 = time.perf_counter()
    for _ in range(count):
        pub.publish("bench/bulk", payload)
    got.wait(30)
    dt = time.perf_counter() - t0
    pub.close()
    sub.close()
    return size * seen[0] / dt


def measure(url: str, protocol: int, model: str, repeat: int, splits: list[int]) -> dict[str, Any]:
    pkg = ModelCache.from_settings().resolve(model)
    n = pkg.num_blocks
    store = Path(tempfile.mkdtemp())
    edge = EdgeAgent(EdgeConfig(id="bench-edge", broker=url, store=store, advertise=False,
                                protocol=protocol))  # fmt: skip
    edge.start()
    try:
        dev = DeviceAgent(pkg, url, "bench-edge", protocol=protocol, split=0, deadline_ms=5000)
        dev.connect()
        t0 = time.perf_counter()
        dev.upload()
        upload_s = time.perf_counter() - t0
        throughput = link_throughput(url, protocol)
        x = np.random.default_rng(0).uniform(-1, 1, pkg.manifest.input.shape).astype(np.float32)
        local = []
        for _ in range(repeat):
            t = time.perf_counter()
            dev.tfl.run(0, n, x)
            local.append((time.perf_counter() - t) * 1e3)
        rows = []
        for k in splits:
            e2e, front, ex, over = [], [], [], []
            for _ in range(repeat):
                o = dev.query(x, split=k)
                assert o.offloaded, o.reason
                out_bytes = pkg.blocks[-1].output_bytes + 300  # result frame ≈ tensor + header
                wire_ms = (o.wire_bytes + out_bytes) / throughput * 1e3
                e2e.append(o.latency_ms)
                front.append(o.front_ms)
                ex.append(o.edge_exec_ms or 0.0)
                over.append(o.latency_ms - o.front_ms - (o.edge_exec_ms or 0.0) - wire_ms)
            rows.append({
                "split": k, "e2e_ms": statistics.median(e2e), "front_ms": statistics.median(front),
                "edge_exec_ms": statistics.median(ex), "overhead_ms": statistics.median(over),
                "query_frame_bytes": o.wire_bytes,
            })  # fmt: skip
        dev.close()
    finally:
        edge.stop()
        shutil.rmtree(store, ignore_errors=True)
    best = min(rows, key=lambda r: r["e2e_ms"])
    return {
        "model": pkg.name, "upload_bytes": dev.bytes_uploaded, "upload_s": upload_s,
        "upload_MBps": dev.bytes_uploaded / upload_s / 1e6, "link_MBps": throughput / 1e6,
        "local_ms": statistics.median(local), "splits": rows,
        "best_split": best["split"], "best_e2e_ms": best["e2e_ms"],
        "best_vs_local": best["e2e_ms"] / statistics.median(local),
        "overhead_ms_median": statistics.median(r["overhead_ms"] for r in rows),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", choices=["mosquitto", "embedded"], default="mosquitto")
    ap.add_argument("--model", default="mobilenet")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--splits", default="0,3,6,10,13,16,17")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    splits = [int(s) for s in a.splits.split(",")]
    tmp = Path(tempfile.mkdtemp())
    if a.broker == "mosquitto":
        proc, url = _mosquitto(tmp)
        try:
            res = measure(url, 5, a.model, a.repeat, splits)
        finally:
            proc.terminate()
            proc.wait(5)
    else:
        with EmbeddedBroker() as b:
            res = measure(b.url, 311, a.model, a.repeat, splits)
    res["broker"] = a.broker
    print(f"{a.broker}: upload {res['upload_bytes'] / 1e6:.1f} MB in {res['upload_s']:.2f} s "
          f"({res['upload_MBps']:.1f} MB/s); broker bulk {res['link_MBps']:.0f} MB/s; "
          f"local-only {res['local_ms']:.2f} ms")  # fmt: skip
    print(f"{'split':>5} {'e2e ms':>8} {'front ms':>9} {'edge ms':>8} {'overhead ms':>12} "
          f"{'frame KB':>9}")  # fmt: skip
    for r in res["splits"]:
        print(f"{r['split']:>5} {r['e2e_ms']:>8.2f} {r['front_ms']:>9.2f} {r['edge_exec_ms']:>8.2f}"
              f" {r['overhead_ms']:>12.2f} {r['query_frame_bytes'] / 1e3:>9.1f}")  # fmt: skip
    print(f"best split {res['best_split']}: {res['best_e2e_ms']:.2f} ms = "
          f"{res['best_vs_local']:.2f}x local-only; median overhead "
          f"{res['overhead_ms_median']:.2f} ms/query")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
