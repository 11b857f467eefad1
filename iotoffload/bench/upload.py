"""The IONN experiment: query latency over time from the first contact with a fresh edge while
the model uploads, per planner and bandwidth, on the emulated network (or loopback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broker.embedded import free_port
from iotoffload.bench.netns import Testbed

EDGE_PORT = 18830  # inside the testbed's own namespace; loopback runs take a free port


@dataclass
class UploadRun:
    planner: str
    rate_mbit: float
    cpu_percent: int
    network: str  # "netns" or "loopback"
    rtt_ms: float = 0.0  # extra round trip through the delay proxy
    records: list[dict[str, Any]] = field(default_factory=list)
    upload_s: float | None = None
    bytes_uploaded: int = 0

    @property
    def first_offload_s(self) -> float | None:
        return next((r["t"] for r in self.records if r["offloaded"]), None)

    def _mean(self, rows: list[dict[str, Any]]) -> float | None:
        return sum(r["latency_ms"] for r in rows) / len(rows) if rows else None

    @property
    def mean_during_upload_ms(self) -> float | None:
        end = self.upload_s if self.upload_s is not None else float("inf")
        return self._mean([r for r in self.records if r["t"] < end])

    @property
    def steady_ms(self) -> float | None:
        if self.upload_s is None:
            return self._mean(self.records)
        return self._mean([r for r in self.records if r["t"] >= self.upload_s])

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("records")
        d.update(
            first_offload_s=self.first_offload_s,
            steady_ms=self.steady_ms,
            mean_during_upload_ms=self.mean_during_upload_ms,
            queries=len(self.records),
        )
        return d


def run_once(
    package: Path,
    planner: str,
    rate_mbit: float,
    *,
    testbed: Testbed | None,
    cpu_percent: int,
    duration: float,
    after_upload: float,
    interval: float,
    rtt_ms: float = 0.0,
    secured: bool = False,
) -> UploadRun:
    """One fresh edge, one device: the device uploads while querying; returns its records.
    ``rtt_ms``: extra round-trip time through a delay proxy in front of the broker.
    ``secured``: the broker runs the setup of ``iotoffload security init`` (TLS, a client
    certificate per agent, the ACL), written for this run to a temporary directory."""
    store = Path(tempfile.mkdtemp(prefix="iotoffload-bench-store-"))
    lab = Path(tempfile.mkdtemp(prefix="iotoffload-bench-lab-")) if secured else None
    lab_args = ["--lab", str(lab)] if lab else []
    host = testbed.edge_ip if testbed else "127.0.0.1"
    port = EDGE_PORT if testbed else free_port()
    py = sys.executable
    edge_args = [
        py,
        "-m",
        "iotoffload.bench._edge_runner",
        "--host",
        host,
        "--port",
        str(port),
        "--store",
        str(store),
        *lab_args,
    ]
    dev_port = port
    proxy = None
    if rtt_ms > 0:
        dev_port = EDGE_PORT + 1 if testbed else free_port()
        proxy_args = [
            py,
            "-m",
            "iotoffload.bench.delay_proxy",
            "--listen",
            f"{host}:{dev_port}",
            "--target",
            f"{host}:{port}",
            "--delay-ms",
            str(rtt_ms / 2),
        ]
        cmd = testbed.edge_cmd(*proxy_args) if testbed else proxy_args
        proxy = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    dev_args = [
        py,
        "-m",
        "iotoffload.bench._device_runner",
        "--broker",
        f"{'mqtts' if secured else 'mqtt'}://{host}:{dev_port}",  # TLS through the proxy
        "--package",
        str(package),
        "--planner",
        planner,
        "--rate-mbit",
        str(rate_mbit),
        "--duration",
        str(duration),
        "--after-upload",
        str(after_upload),
        "--interval",
        str(interval),
        "--edge-speed",
        str(100 / cpu_percent),
        *lab_args,
    ]
    edge = subprocess.Popen(
        testbed.edge_cmd(*edge_args) if testbed else edge_args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    run = UploadRun(planner, rate_mbit, cpu_percent, "netns" if testbed else "loopback", rtt_ms)
    try:
        assert edge.stdout is not None
        if "ready" not in edge.stdout.readline():
            raise RuntimeError("the bench edge did not start")
        if proxy is not None and (proxy.stdout is None or "ready" not in proxy.stdout.readline()):
            raise RuntimeError("the delay proxy did not start")
        dev = subprocess.Popen(
            testbed.device_cmd(*dev_args) if testbed else dev_args,
            stdout=subprocess.PIPE,
            text=True,
        )
        if testbed:
            testbed.limit(dev.pid)
        out, _ = dev.communicate(timeout=duration + 120)
        for line in out.splitlines():
            rec = json.loads(line)
            if rec.get("summary"):
                run.upload_s, run.bytes_uploaded = rec["upload_s"], rec["bytes_uploaded"]
            else:
                run.records.append(rec)
    finally:
        if proxy is not None:
            _stop(proxy, 5)
        _stop(edge, 10)
        shutil.rmtree(store, ignore_errors=True)
        if lab is not None:
            shutil.rmtree(lab, ignore_errors=True)
    return run


def _stop(proc: subprocess.Popen[str], timeout: float) -> None:
    """Close the helper's stdin (its signal to stop); kill it if it does not within timeout."""
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def plot(runs: list[UploadRun], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r.rate_mbit for r in runs})
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for r in (x for x in runs if x.rate_mbit == rate):
            ax.plot(
                [q["t"] for q in r.records],
                [q["latency_ms"] for q in r.records],
                marker=".",
                linewidth=1,
                label=r.planner,
            )
            if r.upload_s:
                ax.axvline(r.upload_s, linestyle=":", linewidth=0.8, color="grey")
        ax.set_title(f"{rate:g} Mbit/s")
        ax.set_xlabel("seconds since first contact")
        ax.set_ylabel("query latency (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
