"""The upload scenario: its summary logic on hand-made records (equal-terms windows, upload
throughput and CPU, waits behind chunks, the goal figures), the planner specs and package
forms, the plot's layout; smoke runs (seconds, so the bench code cannot rot) and the testbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from iotoffload.bench.netns import Testbed, TestbedUnavailableError, check_testbed
from iotoffload.bench.upload import (
    DEFAULT_PLANNERS,
    PlannerSpec,
    UploadRun,
    figure,
    goal_figures,
    headline_lines,
    parse_forms,
    parse_planners,
    pick,
    resolve_form,
    run_once,
    with_alone_ratios,
)
from iotoffload.cli import app
from iotoffload.model import ModelPackage
from iotoffload.model.cache import ModelCache
from iotoffload.model.errors import PackageError

integration = pytest.mark.integration


def _rec(t: float, ms: float, offloaded: bool = False, **kw: Any) -> dict[str, Any]:
    return {"t": t, "latency_ms": ms, "offloaded": offloaded, **kw}


def _ramp() -> UploadRun:
    """A query each second: 10, 20 … 200 ms in [0, 20), then 1000 ms (past the horizon)."""
    recs = [_rec(float(t), 10.0 * (t + 1), offloaded=t >= 3) for t in range(20)]
    recs += [_rec(float(t), 1000.0, offloaded=True) for t in range(20, 25)]
    return UploadRun("ionn", 80, 25, "netns", records=recs, upload_s=5.5, horizon_s=20)


def test_horizon_figures_cover_the_same_window_whatever_the_upload() -> None:
    run = _ramp()
    assert run.mean_first10_ms == 55.0  # 10 … 100
    assert run.mean_horizon_ms == 105.0  # 10 … 200; the 1000s after the horizon left out
    assert run.p95_horizon_ms == pytest.approx(190.5)  # 190 + 0.05 × 10 (linear)
    assert run.mean_during_upload_ms == 35.0  # t = 0 … 5: its own window, as before
    assert run.steady_ms == pytest.approx((1890 + 5000) / 19)
    assert run.first_offload_s == 3.0
    short = UploadRun("local", 80, 25, "netns", records=run.records, horizon_s=5)
    assert short.first_window_s == 5 and short.mean_first10_ms == 30.0  # [0, min(10, 5))
    s = run.summary()
    assert s["label"] == "ionn" and s["queries"] == 25 and s["queries_horizon"] == 20
    assert "records" not in s


def test_upload_throughput_and_cpu_per_mb() -> None:
    run = UploadRun(
        "auto",
        80,
        25,
        "netns",
        upload_s=5.0,
        upload_start_s=1.0,
        bytes_uploaded=20_000_000,
        upload_cpu_s=0.1,
        upload_tflite_cpu_s=0.06,
        upload_query_thread_cpu_s=0.07,
    )
    assert run.upload_seconds == 4.0  # from the upload's own start, not first contact
    assert run.upload_MBps == 5.0
    assert run.upload_cpu_ms_per_MB == pytest.approx(2.0)  # (0.1 − 0.06) s / 20 MB
    assert run.upload_other_threads_cpu_ms_per_MB == pytest.approx(1.5)  # (0.1 − 0.07) / 20
    assert UploadRun("local", 80, 25, "netns").upload_cpu_ms_per_MB is None


def test_wait_behind_chunks_over_the_queries_sent_during_the_upload() -> None:
    recs = [
        _rec(0.0, 50, offloaded=True, behind_upload_ms=None),  # nothing ahead: waited 0
        _rec(1.0, 50, offloaded=True, behind_upload_ms=4.0),
        _rec(2.0, 50, offloaded=True, behind_upload_ms=10.0),
        _rec(3.0, 50, offloaded=False, behind_upload_ms=None),  # ran locally: sent nothing
        _rec(9.0, 50, offloaded=True, behind_upload_ms=99.0),  # after the upload
    ]
    run = UploadRun("auto", 80, 25, "netns", records=recs, upload_s=5.0, horizon_s=10)
    assert run.behind_upload_ms == [0.0, 4.0, 10.0]
    assert run.behind_upload_p50_ms == 4.0
    assert run.behind_upload_p95_ms == pytest.approx(9.4)  # 4 + 0.9 × 6
    old = [{k: v for k, v in r.items() if k != "behind_upload_ms"} for r in recs]
    before = UploadRun("auto", 80, 25, "netns", records=old, upload_s=5.0, horizon_s=10)
    assert before.behind_upload_p50_ms is None  # not reported: '-', not 0


def test_the_queries_own_bytes_bound_the_upload_throughput_while_they_flow() -> None:
    recs = [
        _rec(0.5, 400, offloaded=False),  # ran locally: sent nothing
        _rec(1.0, 200, offloaded=True, wire_bytes=1_000_000),
        _rec(2.0, 200, offloaded=True, wire_bytes=1_000_000),
        _rec(9.0, 150, offloaded=True, wire_bytes=1_000_000),  # after the upload
    ]
    run = UploadRun("auto", 80, 25, "netns", records=recs, upload_s=5.0, bytes_uploaded=8_000_000)
    assert run.query_bytes_during_upload == 2_000_000
    assert run.upload_ceiling_vs_alone == pytest.approx(0.8)  # 8 of the 10 MB on the link
    old = [{k: v for k, v in r.items() if k != "wire_bytes"} for r in recs]
    before = UploadRun("auto", 80, 25, "netns", records=old, upload_s=5.0, bytes_uploaded=8)
    assert before.upload_ceiling_vs_alone is None  # not reported: no ceiling, not 1
    runs = [
        _s("upload-only", upload_MBps=10.0, horizon_s=30.0),
        _s("auto", upload_MBps=7.5, horizon_s=30.0, upload_ceiling_vs_alone=0.8),
        _s("edge:float32", upload_MBps=9.9, horizon_s=30.0, upload_ceiling_vs_alone=1.0),
    ]
    text = "\n".join(headline_lines(with_alone_ratios(runs)))
    assert "auto 0.75×, edge:float32 0.99× (goal ≥ 0.9: missed by auto 0.15)" in text
    assert "; at most, with the queries' own tensors on the link: auto 0.80×" in text
    assert "edge:float32 1.00×" not in text  # sent nothing while uploading: no ceiling noted


def _s(label: str, rate: float = 80, **kw: Any) -> dict[str, Any]:
    planner = "auto" if label.startswith("upload-only") else label.split(":")[0]
    kind = "upload-only" if label.startswith("upload-only") else "queries"
    return {"label": label, "planner": planner, "rate_mbit": rate, "kind": kind, **kw}


def test_upload_is_compared_with_the_alone_run_of_the_same_package() -> None:
    runs = [
        _s("upload-only", upload_MBps=10.0, model_id="small"),
        _s("upload-only:float32", upload_MBps=8.0, model_id="f32"),
        _s("edge:float32", upload_MBps=7.2, model_id="f32"),
        _s("auto", upload_MBps=9.5, model_id="other"),
        _s("auto", rate=20, upload_MBps=2.0, model_id="small"),  # no alone run at 20
        _s("local", upload_MBps=None, model_id="small"),
    ]
    out = {(r["label"], r["rate_mbit"]): r for r in with_alone_ratios(runs)}
    assert out["edge:float32", 80]["upload_vs_alone"] == pytest.approx(0.9)
    assert out["edge:float32", 80]["alone_label"] == "upload-only:float32"
    assert out["auto", 80]["upload_vs_alone"] == pytest.approx(0.95)  # the first alone run
    assert out["auto", 80]["alone_label"] == "upload-only"
    assert out["auto", 20]["upload_vs_alone"] is None
    assert out["local", 80]["upload_vs_alone"] is None
    assert out["upload-only", 80]["upload_vs_alone"] is None


def test_equal_terms_selection_of_the_reference_runs() -> None:
    runs = [
        _s("edge", upload_weights="int8"),
        _s("edge:float32", upload_weights="float32"),
        _s("ionn", upload_weights="float32"),  # plain, but its package is float32
        _s("upload-only", upload_weights="float32"),
    ]
    assert pick(runs, 80, "edge", "float32") is runs[1]
    assert pick(runs, 80, "edge") is runs[0]  # plain: the default form's run
    assert pick(runs, 80, "ionn", "float32") is runs[2]
    assert pick(runs, 80, "auto") is None  # the upload-only run is no query run
    old = [{"planner": "edge", "rate_mbit": 80}]  # a file from before package forms
    assert pick(old, 80, "edge", "float32") is old[0]


def _goal_runs(network: str = "netns") -> list[dict[str, Any]]:
    return with_alone_ratios(
        [
            _s("upload-only", upload_MBps=10.0, upload_cpu_ms_per_MB=2.5, network=network),
            _s("local", mean_first10_ms=100.0, mean_horizon_ms=100.0, network=network),
            _s("edge:float32", mean_horizon_ms=200.0, upload_MBps=9.5, network=network),
            _s("ionn:float32", mean_first10_ms=104.0, mean_horizon_ms=160.0, network=network),
            _s("efficiency", mean_first10_ms=110.0, network=network),
            _s(
                "auto",
                mean_first10_ms=100.0,
                mean_horizon_ms=150.0,
                first_offload_s=1.5,
                upload_MBps=8.5,
                network=network,
            ),
        ]
    )


def test_goal_figures_per_bandwidth() -> None:
    figs = {(f.key, f.subject): f for f in goal_figures(_goal_runs())}
    assert figs["vs_edge_f32", "edge:float32"].value == 0.75
    assert figs["vs_edge_f32", "edge:float32"].met is True  # ≤ 0.75
    ionn = figs["vs_ionn_f32", "ionn:float32"]
    assert ionn.value == pytest.approx(0.9375) and ionn.met is False
    assert ionn.verdict() == "goal ≤ 0.85: missed by 0.09"
    assert figs["first10_vs_local", "ionn:float32"].value == pytest.approx(1.04)
    assert figs["first10_vs_local", "efficiency"].met is False
    assert figs["first10_vs_local", "auto"].value == 1.0
    assert ("first10_vs_local", "edge:float32") not in figs  # not incremental
    assert figs["first_offload_s", "auto"].met is True
    assert figs["upload_vs_alone", "edge:float32"].value == pytest.approx(0.95)
    assert figs["upload_vs_alone", "auto"].met is False  # 0.85 < 0.9
    assert figs["cpu_ms_per_MB", "upload-only"].met is False  # 2.5 > 2
    # on loopback the 80 is no shaped link: the 80-Mbit/s goals do not apply
    lo = {(f.key, f.subject): f for f in goal_figures(_goal_runs("loopback"))}
    assert lo["first_offload_s", "auto"].target is None
    assert lo["cpu_ms_per_MB", "upload-only"].met is None
    assert lo["vs_edge_f32", "edge:float32"].met is True


def test_headline_lines_say_what_was_missed_and_by_how_much() -> None:
    runs = [r | {"horizon_s": 30.0} for r in _goal_runs()]
    text = "\n".join(headline_lines(runs))
    assert (
        "80 Mbit/s, 0–30 s: auto's mean 0.75× edge:float32 (goal ≤ 0.75: met), "
        "0.94× ionn:float32 (goal ≤ 0.85: missed by 0.09)"
    ) in text
    assert "first 10 s vs local: ionn:float32 1.04×, efficiency 1.10×, auto 1.00×" in text
    assert "goal ≤ 1.05: missed by efficiency 0.05" in text
    assert "auto's first offloaded query at 1.50 s; goal ≤ 2 s: met" in text
    assert "edge:float32 0.95×, auto 0.85× (goal ≥ 0.9: missed by auto 0.05)" in text
    assert "upload-only (no queries): 2.50 ms (goal ≤ 2 ms: missed by 0.50 ms)" in text
    assert "offloaded no query" not in text
    never = [r | {"first_offload_s": None, "queries": 40} for r in runs]
    assert "80 Mbit/s: auto offloaded no query in its run" in headline_lines(never)


def test_planner_specs() -> None:
    specs = parse_planners(DEFAULT_PLANNERS)
    assert [s.label for s in specs] == DEFAULT_PLANNERS.split(",")
    assert specs[1] == PlannerSpec("edge", "float32") and specs[1].form == "float32"
    assert specs[3] == PlannerSpec("edge") and specs[3].form == "auto"
    for bad, why in (
        ("ionn,bogus", "unknown planner 'bogus'"),
        ("ionn:float8", "unknown package form 'float8'"),
        ("ionn,ionn", "listed twice"),
        (" , ", "no planners"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_planners(bad)
    assert parse_forms("auto, float32,auto") == ["auto", "float32"] and parse_forms("") == []


def _pkg(form: str) -> Any:
    return SimpleNamespace(manifest=SimpleNamespace(upload_weights=form))


def test_package_forms_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ModelCache(tmp_path)
    asked: list[str] = []

    def with_forms(ref: str, *, upload_weights: str = "auto", progress: object = None) -> Any:
        asked.append(upload_weights)
        return _pkg("int8" if upload_weights == "auto" else upload_weights)

    monkeypatch.setattr(cache, "resolve", with_forms)
    assert package_of(resolve_form(cache, "m", "float16")) == "float16"
    assert package_of(resolve_form(cache, "m", "auto")) == "int8"
    assert asked == ["float16", "auto"]

    def plain(ref: str, *, build: bool = True, progress: object = None) -> Any:
        return _pkg("float32")

    monkeypatch.setattr(cache, "resolve", plain)  # a cache from before package forms
    assert package_of(resolve_form(cache, "m", "float32")) == "float32"
    assert package_of(resolve_form(cache, "m", "auto")) == "float32"
    with pytest.raises(PackageError, match="cannot resolve the int8 form of 'm'"):
        resolve_form(cache, "m", "int8")


def package_of(pkg: Any) -> str:
    return str(pkg.manifest.upload_weights)


def test_cli_rejects_bad_options_before_running_anything(tmp_path: Path) -> None:
    base = ["bench", "upload", "--loopback", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, [*base, "--horizon", "30", "--duration", "20"])
    assert r.exit_code == 2 and "must be at least --horizon" in r.output
    r = CliRunner().invoke(app, [*base, "--planners", "ionn:fp8"])
    assert r.exit_code == 2 and "unknown package form 'fp8'" in r.output
    for bad in ("", "fast", "0,80", "nan"):
        r = CliRunner().invoke(app, [*base, "--bandwidths", bad])
        assert r.exit_code == 2 and "--bandwidths must be" in r.output, bad
    assert not (tmp_path / "upload.json").exists()


def test_the_plot_shares_one_time_axis_and_marks_each_upload_end() -> None:
    import matplotlib.pyplot as plt

    recs = [_rec(float(t), 100.0 + 2 * t) for t in range(12)]
    runs = [UploadRun("local", r, 25, "netns", records=recs, horizon_s=10) for r in (20.0, 80.0)]
    runs += [
        UploadRun("ionn", 80, 25, "netns", records=recs, upload_s=4.0, horizon_s=10),
        UploadRun("ionn", 20, 25, "netns", records=recs, upload_s=40.0, horizon_s=10),
        UploadRun("auto", 80, 25, "netns", upload_s=3.0, label="upload-only", kind="upload-only"),
    ]
    fig = figure(runs, "t")
    try:
        a20, a80 = fig.axes
        assert a20.get_shared_x_axes().joined(a20, a80)
        assert a20.get_xlim() == (0.0, 10.0) and a20.get_yscale() == "log"
        ionn_line = next(ln for ln in a80.get_lines() if ln.get_label().startswith("ionn"))
        ends = [ln for ln in a80.get_lines() if list(ln.get_xdata()) == [4.0, 4.0]]
        assert [ln.get_color() for ln in ends] == [ionn_line.get_color()]
        assert any(list(ln.get_xdata()) == [3.0, 3.0] for ln in a80.get_lines())  # alone
        assert any(ln.get_label() == "local mean 109 ms" for ln in a80.get_lines())
        # past the horizon: no marker in the plot, the end in the legend
        assert not any(list(ln.get_xdata()) == [40.0, 40.0] for ln in a20.get_lines())
        assert any("upload 40.0 s" in str(ln.get_label()) for ln in a20.get_lines())
        assert {t.get_text().strip() for t in a80.texts} == {
            "ionn upload done",
            "upload-only upload done",
        }
    finally:
        plt.close(fig)


@integration
def test_loopback_smoke_writes_table_json_and_plot(
    mobilenet: ModelPackage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every run lasts the horizon (local too), the upload-only run is there, and the JSON
    holds the equal-terms figures and each query's record."""
    monkeypatch.setenv("IOTOFFLOAD_CACHE_DIR", str(mobilenet.root.parent))
    horizon = 3.0
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "upload",
            "--loopback",
            "--bandwidths",
            "100",
            "--planners",
            "local,auto:float32",
            "--upload-alone",
            "float32",
            "--horizon",
            str(horizon),
            "--duration",
            "20",
            "--after-upload",
            "0.5",
            "--interval",
            "0.1",
            "--out",
            str(tmp_path),
            "--rtt-ms",
            "10",  # through the delay proxy
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "upload.json").read_text())
    assert result["network"] == "loopback" and result["rtt_ms"] == 10
    assert result["horizon_s"] == horizon and result["planners"] == ["local", "auto:float32"]
    runs = {x["label"]: x for x in result["runs"]}
    assert set(runs) == {"upload-only", "local", "auto:float32"}
    full = sum(b.upload_bytes for b in mobilenet.blocks)
    alone, auto, local = runs["upload-only"], runs["auto:float32"], runs["local"]
    assert alone["kind"] == "upload-only" and alone["queries"] == 0
    assert alone["bytes_uploaded"] == full and alone["upload_MBps"] > 0
    assert alone["upload_cpu_ms_per_MB"] is not None and alone["upload_cpu_ms_per_MB"] > 0
    assert auto["bytes_uploaded"] == full and auto["upload_weights"] == "float32"
    assert auto["upload_s"] is not None and auto["queries"] > 3
    assert auto["upload_vs_alone"] is not None and auto["alone_label"] == "upload-only"
    assert auto["upload_tflite_cpu_s"] is not None
    assert local["bytes_uploaded"] == 0 and local["queries"] > 3
    for run in (auto, local):  # equal terms: both ran past the horizon, not less
        assert max(q["t"] for q in run["records"]) >= horizon - 0.5
        assert run["mean_horizon_ms"] is not None and run["p95_horizon_ms"] is not None
        assert run["queries_horizon"] == sum(q["t"] < horizon for q in run["records"])
        assert all("tflite_cpu_ms" in q and "front_ms" in q for q in run["records"])
    assert any(g["key"] == "first10_vs_local" for g in result["goals"])
    assert result["headline"]
    assert (tmp_path / "upload.png").stat().st_size > 10_000
    assert "upload scenario" in r.output and "×alone" in r.output


needs_testbed = pytest.mark.skipif(check_testbed() is not None, reason=str(check_testbed()))


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@integration
@needs_testbed
def test_testbed_shapes_the_link_and_cleans_up() -> None:
    receiver = (
        "import socket,sys;s=socket.socket();s.bind(('10.201.0.1',9999));s.listen();"
        "c,_=s.accept();n=0\nwhile (d:=c.recv(65536)): n+=len(d)\nprint(n)"
    )
    with Testbed(rate_mbit=8, device_cpu_percent=50, tag=f"t1{os.getpid() % 1000}") as tb:
        assert tb.dev_ns in _namespaces() and tb.cgroup.exists()
        srv = subprocess.Popen(
            tb.edge_cmd(sys.executable, "-c", receiver), stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.5)
        t0 = time.perf_counter()
        subprocess.run(
            tb.device_cmd(
                sys.executable,
                "-c",
                "import socket;s=socket.create_connection(('10.201.0.1',9999));"
                "s.sendall(b'x'*1_000_000);s.close()",
            ),
            check=True,
        )
        got = int(srv.communicate(timeout=30)[0])
        mbit = got * 8 / (time.perf_counter() - t0) / 1e6
        assert got == 1_000_000
        assert mbit < 9.5  # shaped to 8 Mbit/s (loopback would be thousands)
    assert tb.dev_ns not in _namespaces() and not tb.cgroup.exists()


@integration
@needs_testbed
def test_testbed_is_removed_when_the_body_fails() -> None:
    tb = Testbed(rate_mbit=10, tag=f"t2{os.getpid() % 1000}")
    with pytest.raises(ZeroDivisionError), tb:
        _ = 1 / 0
    assert tb.dev_ns not in _namespaces() and tb.edge_ns not in _namespaces()


@integration
@needs_testbed
def test_upload_run_over_the_emulated_network(mobilenet: ModelPackage) -> None:
    with Testbed(rate_mbit=50, device_cpu_percent=50, tag=f"t3{os.getpid() % 1000}") as tb:
        run = run_once(
            mobilenet.root,
            "auto",
            50,
            testbed=tb,
            cpu_percent=50,
            duration=20,
            after_upload=1,
            interval=0.1,
            rtt_ms=20,
            horizon=3,
        )
    assert run.network == "netns" and run.upload_s is not None and run.rtt_ms == 20
    assert run.bytes_uploaded == sum(b.upload_bytes for b in mobilenet.blocks)
    # 14 MB at 50 Mbit/s takes at least 2.2 s: the shaping applied to the upload
    assert run.upload_s > 2.0 and run.records
    # under the cgroup quota the device's own clocks still measure the upload's CPU
    assert run.upload_cpu_s is not None and run.upload_tflite_cpu_s is not None
    assert run.upload_MBps is not None and run.upload_MBps < 50 / 8 * 1.05
    assert run.upload_cpu_ms_per_MB is not None and run.upload_cpu_ms_per_MB > 0


@integration
@pytest.mark.parametrize("network", ["loopback", pytest.param("netns", marks=needs_testbed)])
def test_upload_run_on_the_secured_broker(mobilenet: ModelPackage, network: str) -> None:
    """The secured setup written for the edge's address (its namespace's, or loopback): the
    device verifies the broker through the delay proxy (TLS passes through it), uploads the
    whole model as itself through the ACL and is answered."""
    kw = dict(cpu_percent=100, duration=20, after_upload=1, interval=0.1, rtt_ms=10, secured=True)
    if network == "netns":
        with Testbed(rate_mbit=200, device_cpu_percent=100, tag=f"t4{os.getpid() % 1000}") as tb:
            run = run_once(mobilenet.root, "edge", 200, testbed=tb, **kw)  # type: ignore[arg-type]
    else:
        run = run_once(mobilenet.root, "edge", 200, testbed=None, **kw)  # type: ignore[arg-type]
    assert run.network == network and run.upload_s is not None
    assert run.bytes_uploaded == sum(b.upload_bytes for b in mobilenet.blocks)
    assert any(r["offloaded"] for r in run.records)


def test_unavailable_testbed_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iotoffload.bench.netns.os.geteuid", lambda: 1000)
    assert "root" in str(check_testbed())
    with pytest.raises(TestbedUnavailableError, match="needs root"):
        Testbed(rate_mbit=1).__enter__()
