"""docs/benchmarks.md from one run's JSON files: tables, plots, the machine, the commands."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from iotoffload.bench.upload import headline_lines, with_alone_ratios


def _f(v: Any, p: int = 1) -> str:
    return "-" if v is None else f"{v:.{p}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


UPLOAD_EXPLAINED = """\
Every run starts from the first contact with a fresh edge (empty store) and lasts at least the
horizon, then until `--after-upload` seconds past its own upload's end (at most `--duration`),
so the columns *mean 0–10 s*, *mean 0–H s* and *p95* (all queries sent in that window, by
their send time) cover the same window for every run; *window mean* is the mean over the run's
own upload (local: its whole run) and *steady* the mean after it, as before horizons. A run is
a planner and the package form it uploads (`ionn:float32`; a plain name uploads the default
form, `auto`: the smallest form the package build verified). *weights* is the form of the
package the run used. *upload-only* uploads the same package with no queries: *MB/s* is the
bytes uploaded over the upload's own seconds (from its start after the announce to its end),
*×alone* that over the upload-only run's at the same bandwidth (same package when there is
one). *CPU ms/MB* is the device process's CPU time (`time.process_time()`, every thread) from
the upload's start to its end, less the CPU TFLite spent on the query thread in that time
(front blocks, local plans and local fallbacks, measured around each TFLite call with the
thread's CPU clock: under the CPU quota a wall-clock figure would count the throttled time
too), per uploaded MB (10^6 bytes); the JSON also has the figure less all the query thread's
CPU (`upload_other_threads_cpu_ms_per_MB`). *wait p50/p95* is the device's estimate of how long
each query's tensor, sent during the upload, waited behind upload chunks already on the link
(an offloaded query with nothing ahead: 0; queries planned local are left out)."""


def _upload(d: dict[str, Any], png: str = "upload.png") -> tuple[str, list[str]]:
    runs: list[dict[str, Any]] = d["runs"]
    if not any("upload_vs_alone" in r for r in runs):
        runs = with_alone_ratios(runs)  # older files: from the fields they have
    horizon = d.get("horizon_s")
    first = d.get("first_window_s")

    def cell(r: dict[str, Any], key: str, p: int = 1) -> str:
        v = r.get(key)
        return "-" if v is None else f"{v:.{p}f}" if isinstance(v, float) else str(v)

    def wait(r: dict[str, Any]) -> str:
        a, b = r.get("behind_upload_p50_ms"), r.get("behind_upload_p95_ms")
        return "-" if a is None or b is None else f"{a:.1f} / {b:.1f}"

    rows = [
        [
            r["rate_mbit"],
            r.get("label") or r["planner"],
            r.get("upload_weights") or r.get("weights") or "-",
            cell(r, "upload_s"),
            cell(r, "first_offload_s"),
            cell(r, "mean_first10_ms"),
            cell(r, "mean_horizon_ms"),
            cell(r, "p95_horizon_ms"),
            cell(r, "mean_during_upload_ms"),
            cell(r, "steady_ms"),
            cell(r, "upload_MBps", 2),
            cell(r, "upload_vs_alone", 2),
            cell(r, "upload_cpu_ms_per_MB", 2),
            wait(r),
        ]
        for r in runs
    ]
    has_horizon = any(r.get("mean_horizon_ms") is not None for r in runs)
    heads = headline_lines(runs) if has_horizon else _window_heads(runs)
    f = f"{first:g}" if first else "10"
    h = f"{horizon:g}" if horizon else "H"
    setup = f"Network: {d['network']}, device CPU {d['cpu_percent']}%, model {d['model']}"
    if d.get("rtt_ms"):
        setup += f", RTT +{d['rtt_ms']:g} ms"
    if horizon:
        setup += f", horizon {h} s from first contact"
    # each run's own (a model without preprocessing falls back to float32), else the asked
    forms = {
        r.get("query_input") or d.get("query_input") for r in runs if r.get("kind") != "upload-only"
    }
    if forms == {"pixels"}:
        setup += (
            ". Every run's queries start from a camera's uint8 frame: offloaded from block 0, "
            "it goes to the edge as its pixels (a quarter of the float32 input's bytes)"
        )
    elif forms == {"float32"}:
        setup += ". Every run's queries start from the float32 input"
    elif len(forms - {None}) > 1:
        setup += ". The runs' queries start from different inputs (pixels, float32): see the JSON"
    text = (
        setup
        + ".\n\n"
        + UPLOAD_EXPLAINED
        + "\n\n"
        + _table(
            [
                "Mbit/s",
                "planner",
                "weights",
                "upload s",
                "1st offload s",
                f"mean 0–{f} s",
                f"mean 0–{h} s",
                "p95",
                "window mean",
                "steady",
                "upload MB/s",
                "×alone",
                "CPU ms/MB",
                "wait p50 / p95 ms",
            ],
            rows,
        )
        + f"\n\n![upload](benchmarks/{png})"
    )
    return text, heads


def _window_heads(runs: list[dict[str, Any]]) -> list[str]:
    """A file from before horizons: auto against the others over each one's upload window."""
    heads = []
    for rate in sorted({r["rate_mbit"] for r in runs}):
        by = {r["planner"]: r for r in runs if r["rate_mbit"] == rate}
        base = by.get("auto")
        for other in ("ionn", "efficiency", "edge"):
            o = by.get(other)
            if base and o and base["mean_during_upload_ms"] and o["mean_during_upload_ms"]:
                ratio = base["mean_during_upload_ms"] / o["mean_during_upload_ms"]
                heads.append(
                    f"{rate:g} Mbit/s: auto vs {other} during the upload window: "
                    f"{ratio:.2f}× the latency"
                )
    return heads


def _handoff(d: dict[str, Any]) -> tuple[str, list[str]]:
    ms = [r["summary"] for r in d["runs"]]
    first = ms[0] if ms else {}
    rows = [
        [
            m["mode"],
            m["queries"],
            m["lost"],
            m["answered_twice"],
            m["no_offload_s"],
            m["local_after_move"],
            m["device_bytes_to_b"] / 1e6,
            m["blocks_from_a"],
            m["fill_before_s"],
        ]
        for m in ms
    ]
    heads = [
        f"handoff {m['mode']}: {m['lost']} lost, {m['answered_twice']} answered twice, "
        f"{_f(m['no_offload_s'], 2)} s without offloading, device sent B "
        f"{m['device_bytes_to_b'] / 1e6:.1f} MB"
        for m in ms
    ]
    header = [
        "mode",
        "queries",
        "lost",
        "twice",
        "s without offload",
        "local after move",
        "device → B MB",
        "blocks A → B",
        "B filled before, s",
    ]
    text = (
        f"Model {d['model']}, split {first.get('split')}, {first.get('rate_qps')} queries/s, "
        f"device uplink capped at {first.get('uplink_mbit')} Mbit/s, backhaul = loopback.\n\n"
        + _table(header, rows)
        + "\n\n![handoff](benchmarks/handoff.png)"
    )
    return text, heads


def _tls_cost(res: list[dict[str, Any]]) -> list[str]:
    """What TLS, client certificates and the ACL cost, from one run of both brokers."""
    by = {r["broker"]: r for r in res}
    plain, tls = by.get("mosquitto"), by.get("mosquitto-tls")
    if plain is None or tls is None:
        return []
    cap = tls.get("upload_cap_mbit")
    at = f" at {cap:g} Mbit/s" if cap else ""
    return [
        f"TLS cost per query (mosquitto-tls vs mosquitto): "
        f"{tls['overhead_ms'] - plain['overhead_ms']:+.2f} ms overhead, best e2e "
        f"{tls['best_e2e_ms'] / plain['best_e2e_ms']:.2f}×; upload{at} "
        f"{tls['upload_MBps'] / plain['upload_MBps']:.3f}× the throughput"
    ]


def build_report(results: Path, doc: Path, command: str) -> list[str]:
    """Write ``doc`` (and copy the PNGs next to it); returns the headline lines."""
    assets = doc.parent / "benchmarks"
    assets.mkdir(parents=True, exist_ok=True)
    for png in results.glob("*.png"):
        shutil.copy(png, assets / png.name)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [
        "# Benchmarks\n",
        f"Generated by `iotoffload bench report` on {stamp} from one run of:\n\n"
        f"```sh\n{command}\n```\n",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}. Shared and noisy: compare ratios "
        "within one run, not absolute times across runs.\n",
    ]
    heads: list[str] = []

    def load(name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
        return data

    # upload.json (the default model's) and upload-MODEL.json, one section per model
    for path in sorted(results.glob("upload*.json"), key=lambda p: (p.stem != "upload", p.stem)):
        d = load(path.stem)
        text, h = _upload(d, f"{path.stem}.png")
        heads += [f"{d['model']}: {line}" for line in h]
        parts.append(f"## Upload (IONN's experiment): {d['model']}\n\n" + text + "\n")
    if (results / "load.json").is_file():
        rows = load("load")["rows"]
        parts.append(
            "## Load (LoADPart)\n\n"
            + _table(
                ["background clients", "planner", "mean ms", "p95 ms", "split"],
                [
                    [r["background"], r["planner"], r["mean_ms"], r["p95_ms"], r["split"]]
                    for r in rows
                ],
            )
            + "\n\n![load](benchmarks/load.png)\n"
        )
        top = max(r["background"] for r in rows)
        la = next(r for r in rows if r["background"] == top and r["planner"] == "loadpart")
        ob = next(r for r in rows if r["background"] == top and r["planner"] == "neurosurgeon")
        heads.append(
            f"load-aware vs oblivious at {top} background clients: mean "
            f"{la['mean_ms'] / ob['mean_ms']:.2f}×, p95 {la['p95_ms'] / ob['p95_ms']:.2f}×"
        )
    if (results / "overhead.json").is_file():
        res = load("overhead")["results"]
        parts.append(
            "## Overhead per query\n\n"
            + _table(
                [
                    "broker",
                    "local ms",
                    "best split",
                    "best e2e ms",
                    "overhead ms",
                    "upload MB/s",
                    "broker MB/s",
                ],
                [
                    [
                        r["broker"],
                        r["local_ms"],
                        r["best_split"],
                        r["best_e2e_ms"],
                        r["overhead_ms"],
                        r["upload_MBps"],
                        r["broker_MBps"],
                    ]
                    for r in res
                ],
            )
            + "\n\n![overhead](benchmarks/overhead.png)\n"
        )
        heads += [f"overhead per query on {r['broker']}: {r['overhead_ms']:.2f} ms" for r in res]
        heads += _tls_cost(res)
    for path in sorted(results.glob("scale*.json"), key=lambda p: (p.stem != "scale", p.stem)):
        text, h = _scale(load(path.stem), f"{path.stem}.png")
        heads += h
        parts.append(text)
    if (results / "energy.json").is_file():
        d = load("energy")
        parts.append(
            f"## Energy (predicted; edge ×{d['edge_speed']:g}, device ×"
            f"{d['device_slowdown']:g})\n\n"
            + _table(
                ["Mbit/s", "objective", "plan", "latency ms", "energy mJ"],
                [
                    [r["rate_mbit"], r["objective"], r["plan"], r["latency_ms"], r["energy_mj"]]
                    for r in d["rows"]
                ],
            )
            + "\n\n![energy](benchmarks/energy.png)\n"
        )
    if (results / "handoff.json").is_file():
        text, h = _handoff(load("handoff"))
        heads += h
        parts.append("## Handoff (a device moves from edge A to edge B)\n\n" + text + "\n")
    parts.insert(3, "## Headline ratios\n\n" + "\n".join(f"- {h}" for h in heads) + "\n")
    doc.write_text("\n".join(parts))
    return heads


def _scale(d: dict[str, Any], png: str = "scale.png") -> tuple[str, list[str]]:
    """The scale section and its headline lines."""
    rows = d["rows"]
    raw, rawb = d.get("raw_qps"), d.get("raw_batched_qps")
    window = int(d.get("window", 1))
    tag = "scale" if window == 1 else f"scale, {window} queries in flight per device"
    intro = ""
    if raw:
        intro = (
            f"Blocks [{d.get('split')}, N) of {d.get('model')}; {d.get('workers', 1)} edge "
            f"worker(s). ONNX Runtime alone on the same blocks, in the same run: {raw:.1f} "
            "queries/s at batch 1"
            + (f", {rawb:.1f} in batches of {d.get('max_batch')}" if rawb else "")
            + ". The devices run in a process of their own, each its own MQTT connection, "
            "and send the intermediate tensor back to back"
            + (
                ", one query at a time.\n\n"
                if window == 1
                else f", {window} queries in flight each (a device streaming frames).\n\n"
            )
        )
    table = _table(
        [
            "devices",
            "max batch",
            "queries",
            "queries/s",
            "vs raw batch 1",
            "mean ms",
            "p95 ms",
            "mean batch",
            "errors",
        ],
        [
            [
                r["devices"],
                r.get("max_batch", 1),
                r["queries"],
                r["qps"],
                r.get("vs_raw", float("nan")),
                r["mean_ms"],
                r["p95_ms"],
                r.get("mean_batch", 1.0),
                r.get("errors", 0),
            ]
            for r in rows
        ],
    )
    heads = []
    if raw:
        best = max(rows, key=lambda r: r["qps"])
        one = [r for r in rows if r["devices"] == 1]
        heads.append(
            f"{tag}: one device "
            + ", ".join(f"{r['vs_raw']:.2f}× (max batch {r.get('max_batch', 1)})" for r in one)
            + f" of raw ONNX Runtime batch 1 (goal 0.9×); best {best['vs_raw']:.2f}× at "
            f"{best['devices']} devices, max batch {best.get('max_batch', 1)} (goal 1.3× with 8+ "
            "devices through batching)"
        )
        top = max(r["devices"] for r in rows)
        heads += [
            f"{tag}: {top} devices on one edge, max batch {r.get('max_batch', 1)}: p95 "
            f"{r['p95_ms']:.1f} ms, {r['qps']:.0f} queries/s, {r.get('errors', 0)} errors"
            for r in rows
            if r["devices"] == top
        ]
    title = "Scale (devices against one edge)" + (
        "" if window == 1 else f", {window} queries in flight per device"
    )
    text = f"## {title}\n\n" + intro + table
    return text + f"\n\n![scale](benchmarks/{png})\n", heads
