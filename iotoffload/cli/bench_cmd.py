"""``iotoffload bench``: scenarios that measure; each prints a table and writes JSON + PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from iotoffload.bench.netns import Testbed, check_testbed
from iotoffload.bench.upload import UploadRun, plot, run_once
from iotoffload.cli._console import console, err_console, rich_progress, user_errors
from iotoffload.model.cache import ModelCache

app = typer.Typer(help="Benchmark scenarios (they measure; tests check behaviour).",
                  no_args_is_help=True, add_completion=False)  # fmt: skip


@app.command()
@user_errors
def upload(
    model: Annotated[str, typer.Option(help="Package name.")] = "mobilenet",
    bandwidths: Annotated[str, typer.Option(help="Mbit/s, comma-separated.")] = "5,20,80",
    planners: Annotated[
        str, typer.Option(help="Comma-separated planners.")
    ] = "local,edge,neurosurgeon,ionn,efficiency,auto",
    cpu: Annotated[int, typer.Option(min=5, max=100, help="Device CPU quota, %.")] = 25,
    interval: Annotated[float, typer.Option(help="Seconds between queries.")] = 0.2,
    duration: Annotated[float, typer.Option(help="Longest run, seconds.")] = 120.0,
    after_upload: Annotated[float, typer.Option(help="Seconds measured after the upload.")] = 5.0,
    loopback: Annotated[bool, typer.Option(help="Skip the emulated network.")] = False,
    out: Annotated[Path, typer.Option(help="Directory for JSON and PNG.")] = Path("bench-results"),
) -> None:
    """IONN's experiment: latency over time from the first contact with a fresh edge while the
    model uploads, per planner and bandwidth (device and edge in network namespaces, tbf-shaped
    link, device CPU quota; loopback when the host cannot build that)."""
    with rich_progress() as progress:
        pkg = ModelCache.from_settings().resolve(model, progress=progress)
    missing = None if loopback else check_testbed()
    if missing:
        err_console.print(f"[yellow]emulated network unavailable: {missing}; running the "
                          "loopback variant (no shaping, no CPU quota)[/]")  # fmt: skip
    use_netns = not loopback and missing is None
    rates = [float(b) for b in bandwidths.split(",")]
    names = [p.strip() for p in planners.split(",") if p.strip()]
    runs: list[UploadRun] = []
    t0 = time.perf_counter()
    for rate in rates:
        for name in names:
            err_console.print(f"{rate:g} Mbit/s, planner {name} …")
            kw = dict(cpu_percent=cpu if use_netns else 100, duration=duration,
                      after_upload=after_upload, interval=interval)  # fmt: skip
            if use_netns:
                with Testbed(rate_mbit=rate, device_cpu_percent=cpu) as tb:
                    runs.append(run_once(pkg.root, name, rate, testbed=tb, **kw))  # type: ignore[arg-type]
            else:
                runs.append(run_once(pkg.root, name, rate, testbed=None, **kw))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "scenario": "upload", "model": pkg.name, "network": "netns" if use_netns else "loopback",
        "cpu_percent": cpu if use_netns else 100, "seconds": time.perf_counter() - t0,
        "runs": [r.summary() | {"records": r.records} for r in runs],
    }  # fmt: skip
    (out / "upload.json").write_text(json.dumps(result, indent=1))
    plot(runs, out / "upload.png", f"{pkg.name}: query latency while the model uploads "
         f"({result['network']}, device CPU {result['cpu_percent']}%)")  # fmt: skip
    t = Table(title=f"upload scenario ({result['network']})")
    for col in ("Mbit/s", "planner", "upload s", "1st offload s", "mean ms (upload)",
                "steady ms", "queries"):  # fmt: skip
        t.add_column(col, justify="right")

    def f(v: float | None, p: int = 2) -> str:
        return "-" if v is None else f"{v:.{p}f}"

    for r in runs:
        t.add_row(
            f"{r.rate_mbit:g}", r.planner, f(r.upload_s), f(r.first_offload_s),
            f(r.mean_during_upload_ms, 1), f(r.steady_ms, 1), str(len(r.records)),
        )  # fmt: skip
    console.print(t)
    console.print(f"wrote {out / 'upload.json'} and {out / 'upload.png'}")
