"""``iotoffload plan``: what each planner would upload first and how queries would run."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Annotated

import typer
from rich.table import Table

from iotoffload.cli._console import console, rich_progress, user_errors
from iotoffload.config import ModelSettings
from iotoffload.model.cache import ModelCache
from iotoffload.planning import PLANNERS, Estimates, Objective, PlanningInputs, make_planner
from iotoffload.planning.explain import replay
from iotoffload.planning.profile import chain_profile
from iotoffload.runtime.profiling import measure_device_ms
from iotoffload.runtime.tflite import TFLiteExecutor

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_rate(text: str) -> float:
    """'10mbit' -> bytes per second."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?bit)(?:/s)?\s*", text.lower())
    if not m:
        raise ValueError(f"bandwidth {text!r}: use e.g. 500kbit, 10mbit, 1gbit")
    return float(m.group(1)) * _UNITS[m.group(2)] / 8


def parse_ms(text: str) -> float:
    m = re.fullmatch(r"\s*([\d.]+)\s*(ms|s)?\s*", text.lower())
    if not m:
        raise ValueError(f"duration {text!r}: use e.g. 5ms or 0.2s")
    return float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0)


@user_errors
def plan(
    model: Annotated[str, typer.Option(help="Package name or directory.")] = "mobilenet",
    bandwidth: Annotated[str, typer.Option(help="Link bandwidth, e.g. 10mbit.")] = "10mbit",
    rtt: Annotated[str, typer.Option(help="Round-trip time, e.g. 5ms.")] = "5ms",
    edge_speed: Annotated[float, typer.Option(help="Edge speed ÷ device speed.")] = 4.0,
    device_slowdown: Annotated[
        float,
        typer.Option(
            help="Scale this machine's measured block times (4 ≈ a Raspberry Pi 4 vs a "
            "laptop core)."
        ),
    ] = 1.0,
    load: Annotated[float, typer.Option(help="Edge load factor (1 = idle).")] = 1.0,
    queue: Annotated[str, typer.Option(help="Edge queueing time.")] = "0ms",
    objective: Annotated[str, typer.Option(help="latency | energy | mix")] = "latency",
    planner: Annotated[str, typer.Option(help="A planner, or all: " + ", ".join(PLANNERS))] = "all",
    min_local: Annotated[int, typer.Option(help="Blocks that always run on the device.")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Explain the plans: upload order, the plan after each upload step, predicted latency
    and energy, and the mean predicted latency while the model uploads."""
    if objective not in ("latency", "energy", "mix"):
        raise ValueError("--objective must be latency, energy or mix")
    obj: Objective = objective  # type: ignore[assignment]
    with rich_progress() as progress:
        pkg = ModelCache.from_settings().resolve(model, progress=progress)
    settings = ModelSettings()
    tfl = TFLiteExecutor.from_package(pkg, threads=settings.tflite_threads)
    d = [v * device_slowdown for v in measure_device_ms(pkg, tfl)]
    est = Estimates(
        bandwidth_Bps=parse_rate(bandwidth),
        rtt_ms=parse_ms(rtt),
        load_factor=load,
        queue_ms=parse_ms(queue),
    )
    p = PlanningInputs(
        chain_profile(pkg, d, edge_speed=edge_speed), est, objective=obj, min_local=min_local
    )
    names = list(PLANNERS) if planner == "all" else [make_planner(planner).name]
    replays = [replay(make_planner(n), p) for n in names]
    local_ms = sum(d)
    if as_json:
        print(
            json.dumps(
                {
                    "model": pkg.name,
                    "bandwidth_Bps": est.bandwidth_Bps,
                    "rtt_ms": est.rtt_ms,
                    "edge_speed": edge_speed,
                    "device_ms": d,
                    "local_ms": local_ms,
                    "planners": [
                        {
                            "planner": r.planner,
                            "order": r.order,
                            "window_ms": r.window_ms,
                            "mean_ms_during_upload": r.mean_ms_during_upload,
                            "first_offload_ms": r.first_offload_ms,
                            "final": r.final.describe(),
                            "final_ms": r.final.latency_ms,
                            "final_mj": r.final.energy_mj,
                            "steps": [
                                dataclasses.asdict(s.plan) | {"block": s.block, "t_ms": s.t_ms}
                                for s in r.steps
                            ],
                        }
                        for r in replays
                    ],
                }
            )
        )
        return
    console.print(
        f"{pkg.name}: device {local_ms:.1f} ms locally (measured × {device_slowdown:g}), edge "
        f"×{edge_speed:g} faster, {bandwidth}, rtt {rtt}, load {load:g}, queue {queue}, "
        f"objective {objective}"
    )
    t = Table(title="planners")
    for col in ("planner", "order", "up s", "1st off s", "mean ms up", "final", "ms", "mJ"):
        t.add_column(col)
    for r in replays:
        t.add_row(
            r.planner,
            ",".join(map(str, r.order[:6])) + (",…" if len(r.order) > 6 else ""),
            f"{r.window_ms / 1e3:.2f}",
            "-" if r.first_offload_ms is None else f"{r.first_offload_ms / 1e3:.2f}",
            f"{r.mean_ms_during_upload:.1f}",
            r.final.describe(),
            f"{r.final.latency_ms:.1f}",
            f"{r.final.energy_mj:.1f}",
        )
    console.print(t)
    if len(replays) == 1:
        r = replays[0]
        steps = Table(title=f"{r.planner}: plan after each upload step")
        for col in ("t s", "uploaded", "plan", "ms", "mJ"):
            steps.add_column(col)
        for s in r.steps:
            steps.add_row(
                f"{s.t_ms / 1e3:.2f}",
                "-" if s.block is None else f"+b{s.block}",
                s.plan.describe(),
                f"{s.plan.latency_ms:.1f}",
                f"{s.plan.energy_mj:.1f}",
            )
        console.print(steps)
