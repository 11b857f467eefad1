"""The IONN experiment: query latency over time from the first contact with a fresh edge while
the model uploads, per planner and bandwidth, on the emulated network (or loopback).

Every run is measured on equal terms: it lasts at least ``horizon`` seconds from first contact
(then until ``after_upload`` seconds past its own upload's end, capped by ``duration``), so the
means over ``[0, horizon)`` and over the first ``FIRST_WINDOW_S`` seconds cover the same window
for every planner; the figures over each run's own upload window (whose lengths differ) stay
beside them. A run is a planner and a package form (``ionn:float32``); per bandwidth an
``upload-only`` run uploads with no queries, the reference for upload throughput and for the
device CPU an upload costs.

The summary logic is pure (records and run fields in, figures out) and works on the JSON's run
dictionaries too, so ``bench report`` computes the headline ratios from a file.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from broker.embedded import free_port
from iotoffload.bench.netns import Testbed
from iotoffload.bench.scenarios import stop_helper
from iotoffload.model.cache import ModelCache
from iotoffload.model.errors import PackageError
from iotoffload.model.package import ModelPackage
from iotoffload.model.progress import Progress
from iotoffload.planning import PLANNERS

EDGE_PORT = 18830  # inside the testbed's own namespace; loopback runs take a free port

# A package form: how the uploaded ONNX blocks store their weights (``auto``: the smallest form
# the package build verified, which is what a plain planner name uses).
WeightsForm = Literal["float32", "float16", "int8", "auto"]
FORMS: tuple[WeightsForm, ...] = get_args(WeightsForm)
DEFAULT_FORM: WeightsForm = "auto"
DEFAULT_PLANNERS = "local,edge:float32,ionn:float32,edge,neurosurgeon,ionn,efficiency,auto"
UPLOAD_ONLY: Literal["upload-only"] = "upload-only"  # the label of a run with no queries
# Planners whose upload order lets queries offload before the whole model is there (edge and
# neurosurgeon need every block of their split first; local uploads nothing).
INCREMENTAL = frozenset({"ionn", "efficiency", "auto"})
DEFAULT_PLANNER = "auto"
FIRST_WINDOW_S = 10.0  # "first 10 s": [0, min(this, horizon))
MB = 1e6  # decimal megabytes, as every other MB/s of the bench

# The goals of issue 14 (bench upload, CPU 25 %, RTT +10 ms); the ones measured at one
# bandwidth only apply there.
GOAL_VS_EDGE_F32 = 0.75  # auto's mean over the horizon / edge:float32's, at most
GOAL_VS_IONN_F32 = 0.85  # auto's / ionn:float32's, at most
GOAL_FIRST10_VS_LOCAL = 1.05  # an incremental planner's first-10-s mean / local's, at most
GOAL_FIRST_OFFLOAD_S = 2.0  # the default planner's first offloaded query, at most …
GOAL_UPLOAD_VS_ALONE = 0.9  # upload throughput while queries flow / alone, at least
GOAL_CPU_MS_PER_MB = 2.0  # the device's CPU per uploaded MB, at most …
GOAL_RATE_MBIT = 80.0  # … at this bandwidth (first offload, CPU per MB)

Record = dict[str, Any]
Summary = Mapping[str, Any]


# planner specs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannerSpec:
    """A ``--planners`` entry: ``name`` or ``name:weights``."""

    name: str
    weights: WeightsForm | None = None  # None: the default form

    @property
    def label(self) -> str:
        return self.name if self.weights is None else f"{self.name}:{self.weights}"

    @property
    def form(self) -> WeightsForm:
        return self.weights or DEFAULT_FORM


def parse_form(text: str) -> WeightsForm:
    for f in FORMS:
        if text == f:
            return f
    raise ValueError(f"unknown package form {text!r}; choose one of {', '.join(FORMS)}")


def parse_planners(text: str) -> list[PlannerSpec]:
    """``local,ionn:float32,auto`` → specs; unknown planners or forms and repeats are errors."""
    specs: list[PlannerSpec] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, form = entry.partition(":")
        if name not in PLANNERS:
            raise ValueError(f"unknown planner {name!r}; choose one of {', '.join(PLANNERS)}")
        spec = PlannerSpec(name, parse_form(form) if sep else None)
        if spec in specs:
            raise ValueError(f"planner {spec.label!r} is listed twice")
        specs.append(spec)
    if not specs:
        raise ValueError("no planners given")
    return specs


def parse_forms(text: str) -> list[WeightsForm]:
    """Comma-separated package forms (repeats dropped, order kept); empty: none."""
    out: list[WeightsForm] = []
    for f in (parse_form(e.strip()) for e in text.split(",") if e.strip()):
        if f not in out:
            out.append(f)
    return out


def package_form(pkg: ModelPackage) -> str:
    """The form a package's ONNX blocks are stored in (float32 for packages from before forms
    existed)."""
    return str(getattr(pkg.manifest, "upload_weights", "float32"))


def resolve_form(
    cache: ModelCache, model: str, form: WeightsForm, progress: Progress | None = None
) -> ModelPackage:
    """The package of ``model`` in ``form``, through ``ModelCache.resolve(name,
    upload_weights=…)``. A cache without package forms has only the plain package: it stands
    for ``float32`` (when it is float32) and ``auto`` (the only form there is); any other form
    is an error that says so."""
    resolve: Callable[..., ModelPackage] = cache.resolve
    if "upload_weights" in inspect.signature(resolve).parameters:
        return resolve(model, upload_weights=form, progress=progress)
    pkg = resolve(model, progress=progress)
    have = package_form(pkg)
    if form in ("auto", have):
        return pkg
    raise PackageError(
        f"cannot resolve the {form} form of {model!r}: this model cache builds no package "
        f"forms (ModelCache.resolve takes no upload_weights) and {model!r} is {have}"
    )


# pure summary logic ----------------------------------------------------------------------------
def window_mean(records: Iterable[Record], start: float, end: float) -> float | None:
    """Mean latency of the queries sent in ``[start, end)`` (None: no query there)."""
    lat = [r["latency_ms"] for r in records if start <= r["t"] < end]
    return sum(lat) / len(lat) if lat else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated (numpy's default, as ``bench load``)."""
    return float(np.percentile(values, q)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class UploadRun:
    planner: str
    rate_mbit: float
    cpu_percent: int
    network: str  # "netns" or "loopback"
    rtt_ms: float = 0.0  # extra round trip through the delay proxy
    records: list[Record] = field(default_factory=list)
    upload_s: float | None = None  # the upload's end, from first contact
    bytes_uploaded: int = 0
    label: str = ""  # planner[:weights], or "upload-only"; default: the planner
    weights: str = DEFAULT_FORM  # the form asked for
    upload_weights: str = "float32"  # the form of the package it ran with
    model_id: str = ""
    kind: Literal["queries", "upload-only"] = "queries"
    horizon_s: float = 0.0
    run_s: float | None = None  # when the last query was sent (upload-only: upload end)
    upload_start_s: float | None = None
    # the device process's CPU over its upload; of which TFLite ran on the query thread, and
    # all the query thread did (TFLite, planning, encoding, the bench's own printing)
    upload_cpu_s: float | None = None
    upload_tflite_cpu_s: float | None = None
    upload_query_thread_cpu_s: float | None = None
    upload_error: str | None = None
    query_input: str | None = None  # what its queries started from: "pixels" or "float32"

    def __post_init__(self) -> None:
        self.label = self.label or self.planner

    @property
    def uploads(self) -> bool:
        return self.planner != "local"

    # the upload window (today's figures) ---------------------------------------------------
    @property
    def first_offload_s(self) -> float | None:
        return next((r["t"] for r in self.records if r["offloaded"]), None)

    def _during_upload(self) -> list[Record]:
        """Queries sent while the upload ran (local: the whole run, as before horizons)."""
        end = self.upload_s if self.upload_s is not None else float("inf")
        return [r for r in self.records if r["t"] < end]

    @property
    def mean_during_upload_ms(self) -> float | None:
        return window_mean(self._during_upload(), 0.0, float("inf"))

    @property
    def steady_ms(self) -> float | None:
        if self.upload_s is None:
            return window_mean(self.records, 0.0, float("inf"))
        return window_mean(self.records, self.upload_s, float("inf"))

    # equal terms: fixed windows from first contact -----------------------------------------
    @property
    def first_window_s(self) -> float:
        return min(FIRST_WINDOW_S, self.horizon_s)

    @property
    def mean_first10_ms(self) -> float | None:
        return window_mean(self.records, 0.0, self.first_window_s)

    @property
    def mean_horizon_ms(self) -> float | None:
        return window_mean(self.records, 0.0, self.horizon_s)

    @property
    def p95_horizon_ms(self) -> float | None:
        return percentile([r["latency_ms"] for r in self.records if r["t"] < self.horizon_s], 95)

    # the upload's own cost ---------------------------------------------------------------------
    @property
    def upload_seconds(self) -> float | None:
        """How long the upload itself took (from its start, after connect and announce)."""
        if self.upload_s is None or self.upload_start_s is None:
            return None
        return self.upload_s - self.upload_start_s

    @property
    def upload_MBps(self) -> float | None:  # noqa: N802
        s = self.upload_seconds
        return self.bytes_uploaded / MB / s if s and self.bytes_uploaded else None

    @property
    def upload_cpu_ms_per_MB(self) -> float | None:  # noqa: N802
        """The device's CPU over the upload, less TFLite's CPU on the query thread, per MB."""
        if self.upload_cpu_s is None or not self.bytes_uploaded or self.upload_seconds is None:
            return None
        cpu = self.upload_cpu_s - (self.upload_tflite_cpu_s or 0.0)
        return cpu * 1e3 / (self.bytes_uploaded / MB)

    @property
    def upload_other_threads_cpu_ms_per_MB(self) -> float | None:  # noqa: N802
        """The same, less everything the query thread did: a lower bound of the upload's cost
        (the query's own network work on paho's thread stays in)."""
        if self.upload_cpu_ms_per_MB is None or self.upload_query_thread_cpu_s is None:
            return None
        assert self.upload_cpu_s is not None  # for mypy: upload_cpu_ms_per_MB has it
        cpu = self.upload_cpu_s - self.upload_query_thread_cpu_s
        return cpu * 1e3 / (self.bytes_uploaded / MB)

    @property
    def query_bytes_during_upload(self) -> int | None:
        """The bytes the offloaded queries sent while the upload ran (their tensors share the
        link with it). None when the device does not report them (a run from before)."""
        rows = self._during_upload()
        if not self.uploads or not any("wire_bytes" in r for r in self.records):
            return None
        return sum(int(r.get("wire_bytes") or 0) for r in rows)

    @property
    def upload_ceiling_vs_alone(self) -> float | None:
        """The most ``upload_vs_alone`` could be with the queries' tensors on the same link:
        the upload's share of the bytes sent while it ran."""
        q = self.query_bytes_during_upload
        if q is None or not self.bytes_uploaded:
            return None
        return self.bytes_uploaded / (self.bytes_uploaded + q)

    @property
    def behind_upload_ms(self) -> list[float] | None:
        """The estimated wait of each tensor sent during the upload behind upload chunks
        already on the link (an offloaded query with nothing ahead: 0). None when the device
        does not report it (a device agent from before the field)."""
        rows = [r for r in self._during_upload() if "behind_upload_ms" in r]
        if not rows or not self.uploads:
            return None
        return [
            float(r["behind_upload_ms"] or 0.0)
            for r in rows
            if r["offloaded"] or r["behind_upload_ms"] is not None
        ]

    @property
    def behind_upload_p50_ms(self) -> float | None:
        w = self.behind_upload_ms
        return None if w is None else percentile(w, 50)

    @property
    def behind_upload_p95_ms(self) -> float | None:
        w = self.behind_upload_ms
        return None if w is None else percentile(w, 95)

    def summary(self) -> dict[str, Any]:
        """The run's fields and figures (no records; no figure that needs another run)."""
        d = asdict(self)
        d.pop("records")
        d.update(
            queries=len(self.records),
            queries_horizon=sum(1 for r in self.records if r["t"] < self.horizon_s),
            first_offload_s=self.first_offload_s,
            steady_ms=self.steady_ms,
            mean_during_upload_ms=self.mean_during_upload_ms,
            first_window_s=self.first_window_s,
            mean_first10_ms=self.mean_first10_ms,
            mean_horizon_ms=self.mean_horizon_ms,
            p95_horizon_ms=self.p95_horizon_ms,
            upload_seconds=self.upload_seconds,
            upload_MBps=self.upload_MBps,
            upload_cpu_ms_per_MB=self.upload_cpu_ms_per_MB,
            upload_other_threads_cpu_ms_per_MB=self.upload_other_threads_cpu_ms_per_MB,
            behind_upload_p50_ms=self.behind_upload_p50_ms,
            behind_upload_p95_ms=self.behind_upload_p95_ms,
            query_bytes_during_upload=self.query_bytes_during_upload,
            upload_ceiling_vs_alone=self.upload_ceiling_vs_alone,
        )
        return d


def _label(r: Summary) -> str:
    return str(r.get("label") or r["planner"])


def _kind(r: Summary) -> str:
    return str(r.get("kind") or "queries")


def alone_run(runs: Sequence[Summary], run: Summary) -> Summary | None:
    """The upload-only run to compare ``run``'s upload with: same bandwidth, same package
    when there is one, else the bandwidth's first upload-only run."""
    alone = [a for a in runs if _kind(a) == UPLOAD_ONLY and a["rate_mbit"] == run["rate_mbit"]]
    same = [a for a in alone if a.get("model_id") and a.get("model_id") == run.get("model_id")]
    return next(iter(same or alone), None)


def with_alone_ratios(runs: Sequence[Summary]) -> list[dict[str, Any]]:
    """The summaries with ``upload_vs_alone`` (upload throughput / the upload-only run's) and
    ``alone_label`` (which run that was) on every run that uploaded while querying."""
    out: list[dict[str, Any]] = []
    for r in runs:
        d = dict(r)
        a = alone_run(runs, r) if _kind(r) != UPLOAD_ONLY else None
        d["upload_vs_alone"] = ratio(r.get("upload_MBps"), a.get("upload_MBps")) if a else None
        d["alone_label"] = _label(a) if a and d["upload_vs_alone"] is not None else None
        out.append(d)
    return out


def pick(
    runs: Sequence[Summary], rate: float, planner: str, form: str | None = None
) -> Summary | None:
    """The query run of ``planner`` at ``rate``: with ``form``, the one labelled
    ``planner:form``, else one whose package is in that form (a file from before package forms
    ran float32 packages); without, the plain (default-form) one."""
    mine = [
        r
        for r in runs
        if _kind(r) != UPLOAD_ONLY and r["rate_mbit"] == rate and r["planner"] == planner
    ]
    if form is None:
        return next((r for r in mine if _label(r) == planner), None)
    return next((r for r in mine if _label(r) == f"{planner}:{form}"), None) or next(
        (r for r in mine if r.get("upload_weights", "float32") == form), None
    )


@dataclass(frozen=True)
class GoalFigure:
    """One measured figure against one of the issue's goals at one bandwidth."""

    rate_mbit: float
    key: str  # vs_edge_f32 | vs_ionn_f32 | first10_vs_local | first_offload_s | …
    subject: str  # the run label it is about
    value: float
    target: float | None  # None: the goal does not apply at this bandwidth
    at_most: bool = True  # False: at least

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target

    def verdict(self, unit: str = "") -> str:
        if self.target is None:
            return ""
        sign = "≤" if self.at_most else "≥"
        goal = f"goal {sign} {self.target:g}{unit}"
        if self.met:
            return f"{goal}: met"
        return f"{goal}: missed by {abs(self.value - self.target):.2f}{unit}"


def goal_figures(runs: Sequence[Summary]) -> list[GoalFigure]:
    """Every goal figure the runs allow, per bandwidth (runs: summaries or JSON run dicts;
    ``upload_vs_alone`` from ``with_alone_ratios``). Missing runs or fields: no figure."""
    out: list[GoalFigure] = []
    for rate in sorted({r["rate_mbit"] for r in runs}):
        # the bandwidth is the shaped link's only on the emulated network (on loopback it is
        # what the planners are told)
        shaped = any(r.get("network") != "loopback" for r in runs if r["rate_mbit"] == rate)
        at_goal_rate = rate == GOAL_RATE_MBIT and shaped
        auto = pick(runs, rate, DEFAULT_PLANNER)
        horizon = auto.get("mean_horizon_ms") if auto else None
        for key, planner, target in (
            ("vs_edge_f32", "edge", GOAL_VS_EDGE_F32),
            ("vs_ionn_f32", "ionn", GOAL_VS_IONN_F32),
        ):
            other = pick(runs, rate, planner, "float32")
            v = ratio(horizon, other.get("mean_horizon_ms")) if other else None
            if v is not None and other is not None:
                out.append(GoalFigure(rate, key, _label(other), v, target))
        local = pick(runs, rate, "local") or pick(runs, rate, "local", "float32")
        base = local.get("mean_first10_ms") if local else None
        for r in runs:
            if _kind(r) == UPLOAD_ONLY or r["rate_mbit"] != rate or r["planner"] not in INCREMENTAL:
                continue
            v = ratio(r.get("mean_first10_ms"), base)
            if v is not None:
                out.append(
                    GoalFigure(rate, "first10_vs_local", _label(r), v, GOAL_FIRST10_VS_LOCAL)
                )
        if auto and auto.get("first_offload_s") is not None:
            t = GOAL_FIRST_OFFLOAD_S if at_goal_rate else None
            out.append(
                GoalFigure(rate, "first_offload_s", _label(auto), auto["first_offload_s"], t)
            )
        for r in runs:
            v = r.get("upload_vs_alone")
            if r["rate_mbit"] == rate and v is not None:
                out.append(
                    GoalFigure(rate, "upload_vs_alone", _label(r), v, GOAL_UPLOAD_VS_ALONE, False)
                )
        for r in runs:
            v = r.get("upload_cpu_ms_per_MB")
            if r["rate_mbit"] == rate and _kind(r) == UPLOAD_ONLY and v is not None:
                t = GOAL_CPU_MS_PER_MB if at_goal_rate else None
                out.append(GoalFigure(rate, "cpu_ms_per_MB", _label(r), v, t))
    return out


def headline_lines(runs: Sequence[Summary]) -> list[str]:
    """The goal figures as the results page's headline lines (a few per bandwidth)."""
    figs = goal_figures(runs)
    horizon = next((r.get("horizon_s") for r in runs if r.get("horizon_s")), None)
    first = min(FIRST_WINDOW_S, horizon) if horizon else FIRST_WINDOW_S
    lines: list[str] = []
    for rate in sorted({f.rate_mbit for f in figs}):
        at = {k: [f for f in figs if f.rate_mbit == rate and f.key == k] for k in _KEYS}
        head = f"{rate:g} Mbit/s"
        vs = [f"{f.value:.2f}× {f.subject} ({f.verdict()})" for f in at["vs_edge_f32"]]
        vs += [f"{f.value:.2f}× {f.subject} ({f.verdict()})" for f in at["vs_ionn_f32"]]
        if vs:
            h = f"0–{horizon:g} s" if horizon else "over the horizon"
            lines.append(f"{head}, {h}: {DEFAULT_PLANNER}'s mean " + ", ".join(vs))
        if at["first10_vs_local"]:
            each = ", ".join(f"{f.subject} {f.value:.2f}×" for f in at["first10_vs_local"])
            lines.append(
                f"{head}, first {first:g} s vs local: {each} ({_worst(at['first10_vs_local'])})"
            )
        for f in at["first_offload_s"]:
            v = f"; {f.verdict(' s')}" if f.target is not None else ""
            lines.append(f"{head}: {f.subject}'s first offloaded query at {f.value:.2f} s{v}")
        auto = pick(runs, rate, DEFAULT_PLANNER)
        if not at["first_offload_s"] and auto is not None and auto.get("queries"):
            # no figure to compare, but the goal's answer all the same: it never offloaded
            lines.append(f"{head}: {DEFAULT_PLANNER} offloaded no query in its run")
        if at["upload_vs_alone"]:
            each = ", ".join(f"{f.subject} {f.value:.2f}×" for f in at["upload_vs_alone"])
            ceilings = [
                f"{_label(r)} {c:.2f}×"
                for r in runs
                if r["rate_mbit"] == rate
                and (c := r.get("upload_ceiling_vs_alone")) is not None
                and c < 0.995  # a run whose queries sent next to nothing: no ceiling to note
            ]
            ceiling = (
                f"; at most, with the queries' own tensors on the link: {', '.join(ceilings)}"
                if ceilings
                else ""
            )
            lines.append(
                f"{head}: upload throughput while queries flow vs alone: {each} "
                f"({_worst(at['upload_vs_alone'])}){ceiling}"
            )
        for f in at["cpu_ms_per_MB"]:
            v = f" ({f.verdict(' ms')})" if f.target is not None else ""
            lines.append(
                f"{head}: device CPU per uploaded MB, {f.subject} (no queries): {f.value:.2f} ms{v}"
            )
    return lines


_KEYS = (
    "vs_edge_f32",
    "vs_ionn_f32",
    "first10_vs_local",
    "first_offload_s",
    "upload_vs_alone",
    "cpu_ms_per_MB",
)


def _worst(figs: Sequence[GoalFigure]) -> str:
    """One verdict for figures against one goal: all met, or who missed and by how much."""
    missed = [f for f in figs if f.met is False]
    sign = "≤" if figs[0].at_most else "≥"
    goal = f"goal {sign} {figs[0].target:g}"
    if not missed:
        return f"{goal}: all met"
    return f"{goal}: missed by " + ", ".join(
        f"{f.subject} {abs(f.value - (f.target or 0.0)):.2f}" for f in missed
    )


# one run ---------------------------------------------------------------------------------------
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
    horizon: float = 0.0,
    label: str = "",
    weights: str = DEFAULT_FORM,
    queries: bool = True,
    query_input: str = "pixels",
) -> UploadRun:
    """One fresh edge, one device: the device uploads while querying; returns its records.
    The run lasts ``max(horizon, upload end + after_upload)`` seconds from first contact,
    at most ``duration``. ``queries=False``: the device only uploads (planner ``planner``'s
    order). ``rtt_ms``: extra round-trip time through a delay proxy in front of the broker.
    ``secured``: the broker runs the setup of ``iotoffload security init`` (TLS, a client
    certificate per agent, the ACL), written for this run to a temporary directory."""
    pkg = ModelPackage.load(package, check_digests=False)  # the runner checks them
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
        "--horizon",
        str(horizon),
        "--duration",
        str(duration),
        "--after-upload",
        str(after_upload),
        "--interval",
        str(interval),
        "--edge-speed",
        str(100 / cpu_percent),
        *([] if queries else ["--no-queries"]),
        "--input",
        query_input,
        *lab_args,
    ]
    edge = subprocess.Popen(
        testbed.edge_cmd(*edge_args) if testbed else edge_args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    run = UploadRun(
        planner,
        rate_mbit,
        cpu_percent,
        "netns" if testbed else "loopback",
        rtt_ms,
        label=label,
        weights=weights,
        upload_weights=package_form(pkg),
        model_id=pkg.manifest.model_id,
        kind="queries" if queries else UPLOAD_ONLY,
        horizon_s=horizon,
    )
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
                _take_summary(run, rec)
            else:
                run.records.append(rec)
    finally:
        if proxy is not None:
            stop_helper(proxy, 5)
        stop_helper(edge, 10)
        shutil.rmtree(store, ignore_errors=True)
        if lab is not None:
            shutil.rmtree(lab, ignore_errors=True)
    return run


def _take_summary(run: UploadRun, rec: Mapping[str, Any]) -> None:
    """The device runner's last line into the run."""
    run.upload_s, run.bytes_uploaded = rec["upload_s"], rec["bytes_uploaded"]
    run.upload_start_s = rec.get("upload_start_s")
    run.run_s = rec.get("run_s")
    run.upload_cpu_s = rec.get("upload_cpu_s")
    run.upload_tflite_cpu_s = rec.get("upload_tflite_cpu_s")
    run.upload_query_thread_cpu_s = rec.get("upload_query_thread_cpu_s")
    run.upload_error = rec.get("upload_error")
    run.query_input = rec.get("query_input")


# the plot --------------------------------------------------------------------------------------
def plot(runs: list[UploadRun], path: Path, title: str) -> None:
    fig = figure(runs, title)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure(runs: list[UploadRun], title: str) -> Any:
    """One subplot per bandwidth on one shared time axis (the horizon's range): a line per
    run, a marker where its upload ended (its colour), local's mean as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rates = sorted({r.rate_mbit for r in runs})
    horizon = max((r.horizon_s for r in runs), default=0.0)
    # without a horizon (runs from run_once's default), the longest run's range
    x_end = horizon or max((q["t"] for r in runs for q in r.records), default=1.0)
    fig, axes = plt.subplots(
        len(rates), 1, figsize=(10, 3.4 * len(rates)), sharex=True, squeeze=False
    )
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 40, not 4×10¹
    for ax, rate in zip(axes[:, 0], rates, strict=True):
        for r in (x for x in runs if x.rate_mbit == rate and x.kind != UPLOAD_ONLY):
            end = f", upload {r.upload_s:.1f} s" if r.upload_s is not None else ""
            (line,) = ax.plot(
                [q["t"] for q in r.records],
                [q["latency_ms"] for q in r.records],
                marker=".",
                markersize=3,
                linewidth=1,
                label=f"{r.label}{end}",
            )
            if r.upload_s is not None and r.upload_s <= x_end:
                _mark(ax, r.upload_s, r.label, line.get_color(), ":")
            if r.planner == "local" and r.mean_horizon_ms is not None:
                ax.axhline(
                    r.mean_horizon_ms,
                    color="black",
                    linestyle="--",
                    linewidth=0.8,
                    label=f"local mean {r.mean_horizon_ms:.0f} ms",
                )
        for r in (x for x in runs if x.rate_mbit == rate and x.kind == UPLOAD_ONLY):
            if r.upload_s is not None and r.upload_s <= x_end:
                _mark(ax, r.upload_s, r.label, "grey", "-.")
        ax.set_title(f"{rate:g} Mbit/s", fontsize=9)
        ax.set_ylabel("query latency (ms)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_xlim(0, x_end)
        ax.legend(fontsize=6, loc="upper right", ncol=2)
    axes[-1, 0].set_xlabel("seconds since first contact")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _mark(ax: Any, x: float, label: str, color: str, style: str) -> None:
    """A vertical marker at ``x`` with its label along it (upload ended)."""
    ax.axvline(x, linestyle=style, linewidth=0.9, color=color)
    ax.text(
        x,
        0.98,
        f" {label} upload done",
        transform=ax.get_xaxis_transform(),
        rotation=90,
        va="top",
        ha="right",
        fontsize=6,
        color=color,
    )
