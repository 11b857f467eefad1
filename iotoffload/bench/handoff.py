"""The handoff scenario: a device sends queries at a fixed rate while it moves from edge A to
edge B (each behind its own broker on loopback), for each way of getting the model onto B:

- ``reupload``: the device uploads the blocks to B again (at its uplink rate);
- ``transfer``: B fetches them from A over the backhaul (edge-to-edge);
- ``proactive``: B was filled before the move (by transfer, in the background);
- ``proactive-upload``: B was filled before the move by the device's own capped upload.

The device's wireless uplink is emulated by capping its upload rate (``uplink_mbit``); the
backhaul between the edges is the loopback, unshaped, as a wired link would be much faster.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import DeviceAgent, QueryOutcome
from iotoffload.bench.scenarios import broker, edge_on
from iotoffload.model.package import ModelPackage

MODES = ("reupload", "transfer", "proactive", "proactive-upload")


@dataclass
class HandoffRun:
    mode: str
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def run_mode(
    pkg: ModelPackage,
    mode: str,
    *,
    rate_qps: float = 10.0,
    before_s: float = 3.0,
    after_s: float = 8.0,
    split: int = 10,
    uplink_mbit: float | None = 20.0,
    kind: str = "mosquitto",
    fill_timeout_s: float = 120.0,
) -> HandoffRun:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    x = np.random.default_rng(0).uniform(-1, 1, pkg.manifest.input.shape).astype(np.float32)
    uplink = None if uplink_mbit is None else uplink_mbit * 1e6 / 8
    run = HandoffRun(mode)
    with ExitStack() as stack:
        lab = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="iotoffload-lab-")))
        ba = stack.enter_context(broker(kind, lab))  # mosquitto-tls: one PKI, one ACL
        bb = stack.enter_context(broker(kind, lab))
        url_a, url_b, proto = ba.url, bb.url, ba.protocol
        stack.enter_context(
            edge_on(
                url_a,
                proto,
                edge_id="bench-a",
                status_interval=0.5,
                peer_edges=["bench-b"],
                security=ba.security("bench-a"),
            )
        )
        edge_b = stack.enter_context(
            edge_on(
                url_b,
                proto,
                edge_id="bench-b",
                status_interval=0.5,
                peer_brokers=[url_a],
                peer_edges=["bench-a"],
                security=bb.security("bench-b"),
            )
        )
        dev = DeviceAgent(
            pkg,
            url_a,
            "bench-a",
            device_id="bench-device",
            security=ba.security("bench-device"),
            protocol=proto,
            split=split,
            deadline_ms=2000,
            transfer=mode in ("transfer", "proactive"),
            proactive=mode.startswith("proactive"),
            upload_rate_Bps=None,
            proactive_rate_Bps=uplink or 1e9,
            probe_interval=0.5,
        )
        stack.callback(dev.close)
        if dev.connect() is None:
            raise RuntimeError("edge A does not answer")
        dev.upload()  # A holds the model before the experiment (not measured)
        dev.upload_rate_Bps = uplink  # from here on the device's uplink is the emulated one
        dev.add_edge("bench-b", url_b)
        full = frozenset(range(pkg.num_blocks))
        fill_s = None
        if mode.startswith("proactive"):  # the move comes once B holds the model
            t = time.monotonic()
            end = t + fill_timeout_s
            while "bench-b" not in dev.sessions or dev.sessions["bench-b"].stored != full:
                if time.monotonic() > end:
                    raise RuntimeError("the proactive fill of B did not finish in time")
                dev.query(x)  # the device keeps working while B fills
                time.sleep(1 / rate_qps)
            fill_s = time.monotonic() - t
        sent_before = dev.bytes_uploaded
        outcomes: list[tuple[float, QueryOutcome]] = []
        t0 = time.monotonic()
        # the move is asked from another thread, as a user's app would: queries may be in
        # flight on A when it happens
        timer = threading.Timer(before_s, dev.set_prefer, args=("bench-b",))
        timer.start()
        stack.callback(timer.cancel)
        total = int((before_s + after_s) * rate_qps)
        for i in range(total):
            due = t0 + i / rate_qps
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = time.monotonic()
            outcomes.append((t - t0, dev.query(x, i)))
        if dev.edge_id != "bench-b":
            raise RuntimeError(f"the device did not move to B: {dev.handoffs}")
        idx = [o.index for _, o in outcomes]
        after = [(t, o) for t, o in outcomes if t >= before_s]
        first_b = next((t for t, o in after if o.edge == "bench-b"), None)
        lat_after = [o.latency_ms for _, o in after]
        run.records = [
            {
                "t_s": round(t, 4),
                "query": o.index,
                "offloaded": o.offloaded,
                "edge": o.edge,
                "latency_ms": round(o.latency_ms, 3),
                "reason": o.reason,
            }
            for t, o in outcomes
        ]
        run.summary = {
            "mode": mode,
            "queries": total,
            "answered": len(set(idx)),
            "lost": total - len(set(idx)),
            "answered_twice": len(idx) - len(set(idx)),
            "late_answers_ignored": dev.late_answers,
            "move_took_s": round(dev.handoffs[-1].at - t0 - before_s, 3),
            "no_offload_s": None if first_b is None else round(first_b - before_s, 3),
            "local_after_move": sum(1 for _, o in after if not o.offloaded),
            "mean_after_ms": statistics.mean(lat_after) if lat_after else None,
            "device_bytes_to_b": dev.sessions["bench-b"].bytes_uploaded,
            "device_bytes_during": dev.bytes_uploaded - sent_before,
            "blocks_from_a": edge_b.stats.blocks_from_peers,
            "fill_before_s": fill_s,
            "uplink_mbit": uplink_mbit,
            "rate_qps": rate_qps,
            "split": split,
        }
    return run


def run_all(pkg: ModelPackage, modes: list[str], **kw: Any) -> list[HandoffRun]:
    return [run_mode(pkg, m, **kw) for m in modes]


def plot(runs: list[HandoffRun], before_s: float, path: Path) -> None:
    """One row per mode, one mark per query: where it ran (edge A, edge B, or the device)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.7 * len(runs) + 1.4))
    colors = {"bench-a": "tab:blue", "bench-b": "tab:green", None: "tab:gray"}
    names = {"bench-a": "on edge A", "bench-b": "on edge B", None: "on the device"}
    for row, r in enumerate(runs):
        for where, color in colors.items():
            ts = [q["t_s"] for q in r.records if q["edge"] == where]
            ax.scatter(
                ts,
                [row] * len(ts),
                s=14,
                marker="|",
                color=color,
                label=names[where] if row == 0 else None,
            )
    ax.axvline(before_s, color="k", ls="--", lw=0.8)
    ax.set_yticks(range(len(runs)), [r.mode for r in runs])
    ax.set_ylim(-0.6, len(runs) - 0.4)
    ax.set_xlabel("seconds (move A → B at the dashed line)")
    ax.set_title("handoff: where each query ran", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
