"""The other bench scenarios: energy (predicted), overhead, load (LoADPart) and scale.

load/scale/overhead run real agents on loopback in one process (broker, edge and devices
share the machine's 2 cores: read the ratios); energy is predicted by the cost model from the
measured device profile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.embedded import EmbeddedBroker, free_port
from broker.mosquitto import mosquitto_running
from broker.secured import SecuredBroker, secured_mosquitto
from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.bench.netns import CGROUP_CPU, check_testbed
from iotoffload.deploy.acl import Role
from iotoffload.model.package import ModelPackage
from iotoffload.planning import Estimates, Objective, PlanningInputs, best_plan, chain_profile
from iotoffload.runtime.onnx import OnnxExecutor
from iotoffload.runtime.profiling import measure_device_ms
from iotoffload.runtime.tflite import TFLiteExecutor
from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.security import MqttSecurity
from iotoffload.transport.topics import Topics


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95)) if xs else float("nan")


SCALE_DEVICES = 16  # identities for `bench scale` on a secured broker
BENCH_AGENTS = {
    "bench-edge": Role.EDGE,
    "bench-sink": Role.EDGE,  # link_throughput's subscriber
    "bench-device": Role.DEVICE,
    "bench-source": Role.APP,  # link_throughput's publisher
    "bench-loadpart": Role.DEVICE,  # `bench load`'s devices
    "bench-neurosurgeon": Role.DEVICE,
    "bench-noise": Role.DEVICE,
    "bench-a": Role.EDGE,  # `bench handoff`'s edges
    "bench-b": Role.EDGE,
    **{f"bench-device-{i}": Role.DEVICE for i in range(SCALE_DEVICES)},
}


@dataclass(frozen=True)
class BenchBroker:
    """A fresh broker on loopback; unpacks as (url, MQTT protocol)."""

    url: str
    protocol: int
    secured: SecuredBroker | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.url, self.protocol))

    def security(self, who: str) -> MqttSecurity:
        """``who``'s credentials (one of BENCH_AGENTS) on a secured broker, else none."""
        return self.secured.security(who) if self.secured else MqttSecurity()


@contextmanager
def broker(kind: str, lab: Path | None = None) -> Iterator[BenchBroker]:
    """A fresh broker on loopback: ``mosquitto``, ``embedded`` or ``mosquitto-tls`` (the
    secured setup of ``iotoffload security init``: TLS, client certificates, the ACL; in
    ``lab``, when given, so that several brokers share one PKI and ACL)."""
    if kind == "embedded":
        with EmbeddedBroker() as b:
            yield BenchBroker(b.url, 311)
        return
    if kind == "mosquitto-tls":
        with secured_mosquitto(BENCH_AGENTS, directory=lab) as sb:
            yield BenchBroker(sb.url, 5, sb)
        return
    if kind != "mosquitto":
        raise ValueError(f"broker kind {kind!r}: mosquitto, mosquitto-tls or embedded")
    with mosquitto_running("127.0.0.1", free_port()) as url:
        yield BenchBroker(url, 5)


@contextmanager
def edge_on(
    url: str,
    protocol: int,
    workers: int = 1,
    edge_id: str = "bench-edge",
    security: MqttSecurity | None = None,
    **config: Any,
) -> Iterator[EdgeAgent]:
    """An edge agent with a fresh store of its own (removed afterwards)."""
    store = Path(tempfile.mkdtemp(prefix=f"iotoffload-{edge_id}-"))
    edge = EdgeAgent(
        EdgeConfig(
            id=edge_id,
            broker=url,
            store=store,
            advertise=False,
            protocol=protocol,
            workers=workers,
            **config,
        ),
        security,
    )
    edge.start()
    try:
        yield edge
    finally:
        edge.stop()
        shutil.rmtree(store, ignore_errors=True)


def energy(
    pkg: ModelPackage, rates_mbit: list[float], edge_speed: float, slowdown: float
) -> list[dict[str, Any]]:
    """Predicted device energy and latency per query, latency vs energy objective."""
    d = [v * slowdown for v in measure_device_ms(pkg, TFLiteExecutor.from_package(pkg))]
    prof = chain_profile(pkg, d, edge_speed=edge_speed)
    rows = []
    for rate in rates_mbit:
        est = Estimates(bandwidth_Bps=rate * 1e6 / 8, rtt_ms=5.0)
        objectives: tuple[Objective, ...] = ("latency", "energy")
        for objective in objectives:
            plan = best_plan(
                PlanningInputs(prof, est, objective=objective), frozenset(range(pkg.num_blocks))
            )
            rows.append(
                {
                    "rate_mbit": rate,
                    "objective": objective,
                    "plan": plan.describe(),
                    "latency_ms": plan.latency_ms,
                    "energy_mj": plan.energy_mj,
                }
            )
    return rows


def _device(pkg: ModelPackage, b: BenchBroker, who: str, **kw: Any) -> DeviceAgent:
    """Device ``who`` (its own identity on a secured broker) of the bench edge."""
    sec = b.security(who)
    dev = DeviceAgent(
        pkg, b.url, "bench-edge", protocol=b.protocol, device_id=who, security=sec, **kw
    )
    if dev.connect() is None:
        raise RuntimeError("the bench edge does not answer")
    return dev


def load(
    pkg: ModelPackage,
    steps: list[int],
    queries: int,
    kind: str = "mosquitto",
    cpu_percent: int = 25,
) -> list[dict[str, Any]]:
    """LoADPart: background clients load the edge in steps; a load-aware and a load-oblivious
    device measure mean and p95 latency at each step. The measuring thread runs under a CPU
    quota (a cgroup-v1 group of its own, when the host allows) so the device really is slow."""
    x = np.zeros(pkg.manifest.input.shape, np.float32)
    rows: list[dict[str, Any]] = []
    with (
        broker(kind) as b,
        edge_on(b.url, b.protocol, security=b.security("bench-edge")) as _edge,
        slow_thread(cpu_percent) as limit,
    ):
        out: dict[str, Any] = {}

        def measure() -> None:
            limit()  # this thread (TFLite runs in it, 1 thread) under the quota
            d = measure_device_ms(pkg, TFLiteExecutor.from_package(pkg), cache=False)
            devs = {
                p: _device(
                    pkg,
                    b,
                    f"bench-{p}",
                    planner=p,
                    device_ms=d,
                    deadline_ms=5000,
                    estimates=Estimates(bandwidth_Bps=100e6, rtt_ms=1.0),
                )
                for p in ("loadpart", "neurosurgeon")
            }
            devs["loadpart"].upload()
            for dev in devs.values():
                dev.probe()  # the other device learns what the edge now holds
            out["devs"], out["local_ms"] = devs, sum(d)

        t = threading.Thread(target=measure)
        t.start()
        t.join()
        devs = out["devs"]
        noise_dev = _device(pkg, b, "bench-noise", split=0, deadline_ms=5000)
        for n_bg in steps:
            stop = threading.Event()

            def background(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    noise_dev.query(x)

            threads = [threading.Thread(target=background, daemon=True) for _ in range(n_bg)]
            for th in threads:
                th.start()
            time.sleep(0.3 if n_bg else 0)

            def step(n_bg: int = n_bg) -> None:
                limit()
                for name, dev in devs.items():
                    lat = [dev.query(x, i).latency_ms for i in range(queries)]
                    rows.append(
                        {
                            "background": n_bg,
                            "planner": name,
                            "mean_ms": statistics.mean(lat),
                            "p95_ms": p95(lat),
                            "split": dev.current_plan().split,
                        }
                    )

            th = threading.Thread(target=step)
            th.start()
            th.join()
            stop.set()
            for th in threads:
                th.join(10)
        for dev in (*devs.values(), noise_dev):
            dev.close()
    return rows


@contextmanager
def slow_thread(cpu_percent: int) -> Iterator[Callable[[], None]]:
    """A cgroup-v1 CPU group; the callable puts the calling thread in it (no-op when the host
    has no cgroup v1 or we are not root)."""
    group = CGROUP_CPU / f"iotoffload-load-{os.getpid()}"
    usable = cpu_percent < 100 and check_testbed() is None
    if usable:
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text("10000")
        (group / "cpu.cfs_quota_us").write_text(str(cpu_percent * 100))

    def limit() -> None:
        if usable:
            (group / "tasks").write_text(str(threading.get_native_id()))

    try:
        yield limit
    finally:
        if usable:
            for tid in (group / "tasks").read_text().split():
                with contextlib.suppress(OSError):
                    (CGROUP_CPU / "tasks").write_text(tid)
            with contextlib.suppress(OSError):
                group.rmdir()


def raw_onnx_qps(pkg: ModelPackage, start: int, seconds: float, threads: int = 1) -> float:
    """ONNX Runtime alone on blocks ``[start, N)``, batch 1, back to back in this process
    with the edge's session settings: the most one edge worker could serve."""
    ex = OnnxExecutor.from_package(pkg, threads=threads)
    x = np.zeros(pkg.blocks[start].input.shape, np.float32)
    n = pkg.num_blocks
    ex.run(start, n, x)  # sessions made and warm, as on a serving edge
    count, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds or count < 3:
        ex.run(start, n, x)
        count += 1
    return count / dt


def scale(
    pkg: ModelPackage, devices: list[int], seconds: float, split: int, kind: str = "mosquitto"
) -> list[dict[str, Any]]:
    """M devices offload back to back against one edge: throughput and p95 as M grows, and
    each step's throughput against ONNX Runtime alone on the same blocks (measured in the
    same run, before the edge starts)."""
    raw = raw_onnx_qps(pkg, split, min(seconds, 3.0))
    x = np.zeros(pkg.manifest.input.shape, np.float32)
    rows: list[dict[str, Any]] = []
    if kind == "mosquitto-tls" and max(devices) > SCALE_DEVICES:
        raise ValueError(f"on mosquitto-tls at most {SCALE_DEVICES} devices (identities)")
    with broker(kind) as b, edge_on(b.url, b.protocol, security=b.security("bench-edge")):
        first = _device(pkg, b, "bench-device-0", split=split, deadline_ms=10_000)
        first.upload()
        pool = [first]
        for m in devices:
            while len(pool) < m:
                who = f"bench-device-{len(pool)}"
                pool.append(_device(pkg, b, who, split=split, deadline_ms=10_000))
            lat: list[list[float]] = [[] for _ in range(m)]
            end = time.perf_counter() + seconds

            def run(i: int, end: float = end, lat: list[list[float]] = lat) -> None:
                while time.perf_counter() < end:
                    lat[i].append(pool[i].query(x).latency_ms)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(m)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            flat = [v for xs in lat for v in xs]
            rows.append(
                {
                    "devices": m,
                    "queries": len(flat),
                    "qps": len(flat) / wall,
                    "mean_ms": statistics.mean(flat),
                    "p95_ms": p95(flat),
                    "raw_qps": raw,
                    "vs_raw": len(flat) / wall / raw,
                }
            )
        for dev in pool:
            dev.close()
    return rows


def link_throughput(
    url: str,
    protocol: int,
    size: int = 600_000,
    count: int = 30,
    b: BenchBroker | None = None,
) -> float:
    """Bytes per second through the broker, publisher to subscriber, QoS 1 (on a secured
    broker, as an app querying an edge: the topic the ACL gives them)."""
    got = threading.Event()
    seen = [0]

    def on_msg(_m: Message) -> None:
        seen[0] += 1
        if seen[0] == count:
            got.set()

    sec = b.security if b is not None else (lambda _who: MqttSecurity())
    topic = Topics().edge_query("bench-sink", "bench-source")
    sub = MqttLink(url, "bench-sink", protocol=protocol, security=sec("bench-sink"))
    sub.subscribe(topic, on_msg)
    sub.connect()
    pub = MqttLink(url, "bench-source", protocol=protocol, security=sec("bench-source"))
    pub.connect()
    t0 = time.perf_counter()
    for _ in range(count):
        pub.publish(topic, b"x" * size)
    got.wait(30)
    dt = time.perf_counter() - t0
    pub.close()
    sub.close()
    return size * seen[0] / dt


def overhead(
    pkg: ModelPackage,
    kind: str,
    repeat: int,
    splits: list[int],
    upload_mbit: float | None = None,
) -> dict[str, Any]:
    """Per query: end-to-end minus front compute, edge execution and the bytes' time.
    ``upload_mbit``: cap the device's upload (its pacing) to measure upload throughput at
    that rate."""
    n = pkg.num_blocks
    x = np.random.default_rng(0).uniform(-1, 1, pkg.manifest.input.shape).astype(np.float32)
    with broker(kind) as b, edge_on(b.url, b.protocol, security=b.security("bench-edge")):
        url, proto = b.url, b.protocol
        rate = None if upload_mbit is None else upload_mbit * 1e6 / 8
        dev = _device(pkg, b, "bench-device", split=0, deadline_ms=5000, upload_rate_Bps=rate)
        t0 = time.perf_counter()
        dev.upload()
        upload_s = time.perf_counter() - t0
        bps = link_throughput(url, proto, b=b)
        local = []
        for _ in range(repeat):
            t = time.perf_counter()
            dev.tfl.run(0, n, x)
            local.append((time.perf_counter() - t) * 1e3)
        rows = []
        for k in splits:
            e2e, over = [], []
            offloaded = 0
            for _ in range(repeat):
                o = dev.query(x, split=k)
                offloaded += o.offloaded
                wire = (o.wire_bytes + pkg.blocks[-1].output_bytes + 300) / bps * 1e3
                e2e.append(o.latency_ms)
                # the edge's own compute (ONNX Runtime's block times) is not overhead; its
                # handoff to and from the worker process is
                compute = o.edge_compute_ms if o.edge_compute_ms else (o.edge_exec_ms or 0.0)
                over.append(o.latency_ms - o.front_ms - compute - wire)
            rows.append(
                {
                    "split": k,
                    "e2e_ms": statistics.median(e2e),
                    "overhead_ms": statistics.median(over),
                    "offloaded": offloaded / repeat,
                }
            )
        dev.close()
    best = min(rows, key=lambda r: r["e2e_ms"])
    return {
        "broker": kind,
        "local_ms": statistics.median(local),
        "splits": rows,
        "best_split": best["split"],
        "best_e2e_ms": best["e2e_ms"],
        "overhead_ms": statistics.median(r["overhead_ms"] for r in rows),
        "upload_MBps": dev.bytes_uploaded / upload_s / 1e6,
        "upload_cap_mbit": upload_mbit,
        "broker_MBps": bps / 1e6,
    }
