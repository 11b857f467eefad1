"""``iotoffload bench``: scenarios that measure; each prints a table and writes JSON + PNG."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from iotoffload.bench.netns import Testbed, check_testbed
from iotoffload.bench.upload import (
    DEFAULT_PLANNERS,
    FIRST_WINDOW_S,
    UPLOAD_ONLY,
    UploadRun,
    WeightsForm,
    goal_figures,
    headline_lines,
    parse_forms,
    parse_planners,
    plot,
    resolve_form,
    run_once,
    with_alone_ratios,
)
from iotoffload.cli._console import console, err_console, rich_progress, user_errors
from iotoffload.model.cache import ModelCache
from iotoffload.model.package import ModelPackage
from iotoffload.planning import PLANNERS

app = typer.Typer(
    help="Benchmark scenarios (they measure; tests check behaviour).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
@user_errors
def upload(
    model: Annotated[str, typer.Option(help="Package name.")] = "mobilenet",
    bandwidths: Annotated[str, typer.Option(help="Mbit/s, comma-separated.")] = "5,20,80",
    planners: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated runs: a planner ({', '.join(PLANNERS)}) as `name` (its "
            "package in the default form, auto) or "
            "`name:weights` with weights float32, float16, int8 or auto (the package form "
            "uploaded; e.g. `ionn:float32`)."
        ),
    ] = DEFAULT_PLANNERS,
    upload_alone: Annotated[
        str,
        typer.Option(
            help="Package forms uploaded with no queries at each bandwidth, the reference for "
            "upload throughput and device CPU per MB (comma-separated; the first is labelled "
            "`upload-only`, the others `upload-only:FORM`; forms that resolve to one package "
            "run once; empty: none)."
        ),
    ] = "auto,float32",
    horizon: Annotated[
        float,
        typer.Option(
            min=0,
            help="Every run lasts at least this long from first contact, seconds; the "
            "equal-terms figures (mean, p95, the first 10 s) are over [0, horizon).",
        ),
    ] = 30.0,
    cpu: Annotated[int, typer.Option(min=5, max=100, help="Device CPU quota, %.")] = 25,
    interval: Annotated[float, typer.Option(min=0, help="Seconds between queries.")] = 0.2,
    duration: Annotated[
        float,
        typer.Option(
            help="Longest run, seconds (at least --horizon): a run whose upload has not ended "
            "stops here."
        ),
    ] = 120.0,
    after_upload: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds a run goes on after its upload ended (the steady figures); a run "
            "lasts max(horizon, upload end + this), at most --duration.",
        ),
    ] = 5.0,
    loopback: Annotated[
        bool, typer.Option(help="Skip the emulated network (no shaping, no CPU quota).")
    ] = False,
    rtt_ms: Annotated[
        float, typer.Option(min=0, help="Extra round-trip time (delay proxy), ms.")
    ] = 0.0,
    secured: Annotated[
        bool,
        typer.Option(
            help="The broker runs the setup of `iotoffload security init` (TLS, a client "
            "certificate per agent, the ACL); the device and the edge connect as themselves."
        ),
    ] = False,
    query_input: Annotated[
        str,
        typer.Option(
            "--input",
            help="What each query starts from: a camera's uint8 frame (`pixels`: a device "
            "offloading from block 0 sends it as it is, a quarter of the float32 tensor's "
            "bytes, and the edge normalises it) or the model's float32 input, as IONN sends.",
        ),
    ] = "pixels",
    out: Annotated[Path, typer.Option(help="Directory for JSON and PNG.")] = Path("bench-results"),
) -> None:
    """IONN's experiment: latency over time from the first contact with a fresh edge while the
    model uploads, per planner, package form and bandwidth, every run over the same horizon;
    plus an upload with no queries per bandwidth (device and edge in network namespaces,
    tbf-shaped link, device CPU quota; loopback when the host cannot build that)."""
    specs = parse_planners(planners)
    alone_forms = parse_forms(upload_alone)
    if query_input not in ("pixels", "float32"):
        raise ValueError(f"--input {query_input!r}: pixels or float32")
    if duration < horizon:
        raise ValueError(f"--duration ({duration:g} s) must be at least --horizon ({horizon:g} s)")
    rates = _rates(bandwidths)
    cache = ModelCache.from_settings()
    packages: dict[WeightsForm, ModelPackage] = {}
    with rich_progress() as progress:  # every form up front: a form that fails, fails now
        for form in dict.fromkeys([*alone_forms, *(s.form for s in specs)]):
            packages[form] = resolve_form(cache, model, form, progress)
    missing = None if loopback else check_testbed()
    if missing:
        err_console.print(
            f"[yellow]emulated network unavailable: {missing}; running the "
            "loopback variant (no shaping, no CPU quota)[/]"
        )
    use_netns = not loopback and missing is None
    if use_netns:  # a kill (SIGTERM) unwinds like Ctrl-C: the testbed is removed either way
        signal.signal(signal.SIGTERM, _interrupt)
    # (label, planner, form, queries): the upload-only runs first, one per distinct package
    plan: list[tuple[str, str, WeightsForm, bool]] = []
    seen: set[Path] = set()
    for i, form in enumerate(alone_forms):
        if packages[form].root not in seen:
            seen.add(packages[form].root)
            plan.append((UPLOAD_ONLY if i == 0 else f"{UPLOAD_ONLY}:{form}", "auto", form, False))
    plan += [(s.label, s.name, s.form, True) for s in specs]
    runs: list[UploadRun] = []
    t0 = time.perf_counter()
    for rate in rates:
        for label, name, form, queries in plan:
            err_console.print(f"{rate:g} Mbit/s, {label} …")
            kw = dict(
                cpu_percent=cpu if use_netns else 100,
                duration=duration,
                after_upload=after_upload,
                interval=interval,
                rtt_ms=rtt_ms,
                secured=secured,
                horizon=horizon,
                label=label,
                weights=form,
                queries=queries,
                query_input=query_input,
            )
            root = packages[form].root
            if use_netns:
                with Testbed(rate_mbit=rate, device_cpu_percent=cpu) as tb:
                    runs.append(run_once(root, name, rate, testbed=tb, **kw))  # type: ignore[arg-type]
            else:
                runs.append(run_once(root, name, rate, testbed=None, **kw))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    summaries = with_alone_ratios([r.summary() for r in runs])
    heads = headline_lines(summaries)
    result = {
        "scenario": "upload",
        "model": packages[specs[0].form].name,
        "network": "netns" if use_netns else "loopback",
        "cpu_percent": cpu if use_netns else 100,
        "seconds": time.perf_counter() - t0,
        "rtt_ms": rtt_ms,
        "secured": secured,
        "query_input": query_input,
        "horizon_s": horizon,
        "first_window_s": min(FIRST_WINDOW_S, horizon),
        "duration_s": duration,
        "after_upload_s": after_upload,
        "interval_s": interval,
        "planners": [s.label for s in specs],
        "goals": [asdict(g) | {"met": g.met} for g in goal_figures(summaries)],
        "headline": heads,
        "runs": [s | {"records": r.records} for s, r in zip(summaries, runs, strict=True)],
    }
    # one file per model: a full run (benchmarks/run_all.sh) uploads several into one directory
    stem = "upload" if result["model"] == "mobilenet" else f"upload-{result['model']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(
        runs,
        out / f"{stem}.png",
        f"{result['model']}: query latency while the model uploads "
        f"({result['network']}, device CPU {result['cpu_percent']}%, RTT +{rtt_ms:g} ms)",
    )
    # wider than a narrow terminal (or a log file's 80 columns) rather than cut: every cell
    # is a figure someone reads
    table = _upload_table(f"upload scenario ({result['network']})", summaries, horizon)
    need = Measurement.get(console, console.options.update(width=1000), table).maximum
    Console(width=max(console.width, need), file=console.file).print(table)
    for h in heads:
        console.print(f"- {h}")
    console.print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")


def _rates(text: str) -> list[float]:
    """``5,20,80`` → Mbit/s, each positive; at least one."""
    try:
        rates = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(
            f"--bandwidths must be Mbit/s numbers, comma-separated: {text!r}"
        ) from None
    if not rates or any(not 0 < r < float("inf") for r in rates):
        raise ValueError(f"--bandwidths must be positive Mbit/s, comma-separated: {text!r}")
    return rates


def _upload_table(title: str, runs: list[dict[str, Any]], horizon: float) -> Table:
    """The upload scenario's key columns, one row per run (every figure is in the JSON)."""
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    first = min(FIRST_WINDOW_S, horizon)
    cols = (
        ("Mbit/s", "rate_mbit", 0),
        ("run", "label", 0),
        ("weights", "upload_weights", 0),
        ("upload s", "upload_s", 1),
        ("1st off s", "first_offload_s", 2),
        (f"0-{first:g}s ms", "mean_first10_ms", 1),
        (f"0-{horizon:g}s ms", "mean_horizon_ms", 1),
        ("p95", "p95_horizon_ms", 1),
        ("window", "mean_during_upload_ms", 1),
        ("steady", "steady_ms", 1),
        ("MB/s", "upload_MBps", 2),
        ("×alone", "upload_vs_alone", 2),
        ("CPU ms/MB", "upload_cpu_ms_per_MB", 2),
        ("wait p50/p95", None, 1),
    )
    for name, _, _ in cols:
        t.add_column(name, justify="right")

    def f(v: Any, p: int) -> str:  # p = 0: as it is (labels, the bandwidth)
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.{p}f}" if p else f"{v:g}"
        return str(v)

    for r in runs:
        cells = []
        for _, key, p in cols:
            if key is None:
                a, b = r.get("behind_upload_p50_ms"), r.get("behind_upload_p95_ms")
                cells.append("-" if a is None else f"{f(a, p)}/{f(b, p)}")
            else:
                cells.append(f(r.get(key), p))
        t.add_row(*cells)
    return t


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _save(out: Path, name: str, result: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))


def _bars(
    out: Path, name: str, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(series))
    for j, (label, values) in enumerate(series.items()):
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def _table(title: str, rows: list[dict[str, object]]) -> Table:
    t = Table(title=title)
    for col in rows[0]:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()))
    return t


OutOpt = Annotated[Path, typer.Option(help="Directory for JSON and PNG.")]
ModelOpt = Annotated[str, typer.Option(help="Package name.")]
BrokerOpt = Annotated[
    str,
    typer.Option(
        help="mosquitto, embedded, or mosquitto-tls (TLS, a client certificate per agent and "
        "the ACL of `iotoffload security init`)."
    ),
]


@app.command()
@user_errors
def energy(
    model: ModelOpt = "mobilenet",
    bandwidths: Annotated[str, typer.Option(help="Mbit/s, comma-separated.")] = "5,20,80",
    edge_speed: Annotated[float, typer.Option(help="Edge ÷ device speed.")] = 10.0,
    device_slowdown: Annotated[float, typer.Option(help="× this machine's block times.")] = 10.0,
    out: OutOpt = Path("bench-results"),
) -> None:
    """Predicted device energy (and latency) per query: latency vs energy objective."""
    from iotoffload.bench.scenarios import energy as run

    pkg = ModelCache.from_settings().resolve(model)
    rows = run(pkg, [float(b) for b in bandwidths.split(",")], edge_speed, device_slowdown)
    _save(
        out,
        "energy",
        {
            "scenario": "energy",
            "model": pkg.name,
            "edge_speed": edge_speed,
            "device_slowdown": device_slowdown,
            "rows": rows,
        },
    )
    groups = [f"{r['rate_mbit']:g} Mbit/s" for r in rows if r["objective"] == "latency"]
    _bars(
        out,
        "energy",
        f"{pkg.name}: predicted device energy per query",
        groups,
        {
            o: [float(r["energy_mj"]) for r in rows if r["objective"] == o]
            for o in ("latency", "energy")
        },
        "mJ",
    )
    console.print(_table("energy scenario (predicted)", rows))


@app.command()
@user_errors
def overhead(
    model: ModelOpt = "mobilenet",
    brokers: Annotated[
        str,
        typer.Option(
            help="mosquitto, embedded, mosquitto-tls (TLS, client certificates and the ACL "
            "of `iotoffload security init`)"
        ),
    ] = "mosquitto,embedded",
    repeat: Annotated[int, typer.Option(min=1)] = 30,
    splits: Annotated[str, typer.Option()] = "0,3,6,10,13,16,17",
    upload_mbit: Annotated[
        float | None,
        typer.Option(
            help="Cap the device's upload at this rate (upload_MBps then says what "
            "it reaches at that rate)."
        ),
    ] = None,
    out: OutOpt = Path("bench-results"),
) -> None:
    """The middleware's own cost per query on each broker (loopback), and the upload's
    throughput. mosquitto,mosquitto-tls in one run gives the cost of TLS and the ACL."""
    from iotoffload.bench.scenarios import overhead as run

    pkg = ModelCache.from_settings().resolve(model)
    ks = [int(k) for k in splits.split(",") if int(k) <= pkg.num_blocks]
    results = [run(pkg, b.strip(), repeat, ks, upload_mbit) for b in brokers.split(",")]
    _save(out, "overhead", {"scenario": "overhead", "model": pkg.name, "results": results})
    _bars(
        out,
        "overhead",
        f"{pkg.name}: middleware overhead per query",
        [f"k={k}" for k in ks],
        {r["broker"]: [s["overhead_ms"] for s in r["splits"]] for r in results},
        "ms",
    )
    console.print(
        _table(
            "overhead scenario",
            [
                {
                    k: r[k]
                    for k in (
                        "broker",
                        "local_ms",
                        "best_split",
                        "best_e2e_ms",
                        "overhead_ms",
                        "upload_MBps",
                        "broker_MBps",
                    )
                }
                for r in results
            ],
        )
    )


@app.command()
@user_errors
def load(
    model: ModelOpt = "mobilenet",
    steps: Annotated[str, typer.Option(help="Background clients per step.")] = "0,1,2,4",
    queries: Annotated[int, typer.Option(min=1)] = 20,
    cpu: Annotated[int, typer.Option(min=5, max=100, help="Device CPU quota, % (root).")] = 25,
    broker: BrokerOpt = "mosquitto",
    out: OutOpt = Path("bench-results"),
) -> None:
    """LoADPart's experiment: load-aware vs load-oblivious split as background clients load
    the edge in steps (loopback; the measuring device thread under a CPU quota)."""
    from iotoffload.bench.scenarios import load as run

    pkg = ModelCache.from_settings().resolve(model)
    rows = run(pkg, [int(s) for s in steps.split(",")], queries, broker, cpu_percent=cpu)
    _save(out, "load", {"scenario": "load", "model": pkg.name, "rows": rows})
    groups = sorted({f"{r['background']} clients" for r in rows}, key=lambda g: int(g.split()[0]))
    _bars(
        out,
        "load",
        f"{pkg.name}: mean latency under edge load",
        groups,
        {
            p: [float(r["mean_ms"]) for r in rows if r["planner"] == p]
            for p in ("loadpart", "neurosurgeon")
        },
        "ms",
    )
    console.print(_table("load scenario", rows))


@app.command()
@user_errors
def scale(
    model: ModelOpt = "mobilenet",
    devices: Annotated[str, typer.Option(help="Device counts.")] = "1,2,4,8,16,100",
    seconds: Annotated[float, typer.Option()] = 5.0,
    split: Annotated[int, typer.Option(help="The devices offload blocks [split, N).")] = 10,
    max_batch: Annotated[int, typer.Option(help="The edge's batch size when batching.")] = 8,
    window: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="Queries each device keeps in flight (1: waits for each answer)."
        ),
    ] = 1,
    broker: BrokerOpt = "mosquitto",
    out: OutOpt = Path("bench-results"),
) -> None:
    """M devices against one edge, batching off and on: throughput, mean and p95 latency as
    M grows, against ONNX Runtime alone on the same blocks (batch 1 and batched; loopback).
    The devices run in a process of their own and send the intermediate tensor; each keeps
    --window queries in flight (a device streaming frames: more than 1)."""
    from iotoffload.bench.scenarios import scale as run

    pkg = ModelCache.from_settings().resolve(model)
    counts_in = [int(m) for m in devices.split(",")]
    res = run(pkg, counts_in, seconds, split, broker, max_batch, window)
    rows = res["rows"]
    name = "scale" if window == 1 else f"scale-window{window}"
    _save(out, name, {"scenario": "scale", "model": pkg.name, "split": split, **res})
    counts = sorted({r["devices"] for r in rows})
    _bars(
        out,
        name,
        f"{pkg.name}: devices against one edge, {window} in flight each (queries/s)",
        [str(m) for m in counts],
        {
            f"max_batch {b}": [
                float(r["qps"])
                for m in counts
                for r in rows
                if r["devices"] == m and r["max_batch"] == b
            ]
            for b in sorted({r["max_batch"] for r in rows})
        },
        "",
    )
    console.print(
        f"ONNX Runtime alone on blocks [{split}, {pkg.num_blocks}): {res['raw_qps']:.1f} "
        f"queries/s at batch 1, {res['raw_batched_qps']:.1f} in batches of {max_batch}; "
        f"{res['workers']} edge worker(s); {window} queries in flight per device"
    )
    console.print(_table("scale scenario", rows))


@app.command()
@user_errors
def handoff(
    model: ModelOpt = "mobilenet",
    modes: Annotated[
        str, typer.Option(help="reupload,transfer,proactive,proactive-upload")
    ] = "reupload,transfer,proactive,proactive-upload",
    rate: Annotated[float, typer.Option(min=0.5, max=100, help="Queries per second.")] = 10.0,
    before: Annotated[float, typer.Option(min=0.5, help="Seconds on A before the move.")] = 3.0,
    after: Annotated[float, typer.Option(min=0.5, help="Seconds after the move.")] = 8.0,
    split: Annotated[int, typer.Option(help="Fixed split: offloading is visible.")] = 10,
    uplink: Annotated[
        float, typer.Option(help="The device's uplink, Mbit/s (its upload is capped); 0: none.")
    ] = 20.0,
    broker: Annotated[
        str,
        typer.Option(
            help="mosquitto, or mosquitto-tls (both brokers share one PKI and ACL of "
            "`iotoffload security init`; the edges transfer through it as themselves)."
        ),
    ] = "mosquitto",
    out: OutOpt = Path("bench-results"),
) -> None:
    """A device moves from edge A to edge B while it sends queries at a fixed rate; queries
    lost, answered twice, time without offloading and the device's bytes, for each way of
    getting the model onto B (loopback, one mosquitto per edge)."""
    from iotoffload.bench.handoff import MODES, plot, run_all

    pkg = ModelCache.from_settings().resolve(model)
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in chosen if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    runs = run_all(
        pkg,
        chosen,
        rate_qps=rate,
        before_s=before,
        after_s=after,
        split=split,
        uplink_mbit=uplink or None,
        kind=broker,
    )
    _save(
        out,
        "handoff",
        {
            "scenario": "handoff",
            "model": pkg.name,
            "runs": [{"summary": r.summary, "records": r.records} for r in runs],
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, before, out / "handoff.png")
    t = Table(title="handoff scenario (A → B at the dashed line)")
    for col in (
        "mode",
        "queries",
        "lost",
        "twice",
        "s without offload",
        "local after move",
        "device → B MB",
        "blocks A → B",
        "B filled before, s",
    ):
        t.add_column(col, justify="right")
    for r in runs:
        m = r.summary
        t.add_row(
            m["mode"],
            str(m["queries"]),
            str(m["lost"]),
            str(m["answered_twice"]),
            "never" if m["no_offload_s"] is None else f"{m['no_offload_s']:.2f}",
            str(m["local_after_move"]),
            f"{m['device_bytes_to_b'] / 1e6:.2f}",
            str(m["blocks_from_a"]),
            "-" if m["fill_before_s"] is None else f"{m['fill_before_s']:.2f}",
        )
    console.print(t)
    console.print(f"wrote {out / 'handoff.json'} and {out / 'handoff.png'}")


@app.command()
@user_errors
def report(
    results: Annotated[Path, typer.Option(help="Directory with the scenarios' JSON.")] = Path(
        "bench-results"
    ),
    doc: Annotated[Path, typer.Option(help="The page to write.")] = Path("docs/benchmarks.md"),
    command: Annotated[str, typer.Option(help="The command line that produced the results.")] = "",
) -> None:
    """Write the results page (tables, plots, machine, command) from one run's JSON files."""
    from iotoffload.bench.report import build_report

    heads = build_report(results, doc, command or "iotoffload bench … --out " + str(results))
    for h in heads:
        console.print(f"- {h}")
    console.print(f"wrote {doc}")
