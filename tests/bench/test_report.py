"""The results page's TLS line and its upload section, on hand-checkable numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iotoffload.bench.report import _tls_cost, build_report


def _row(broker: str, overhead: float, e2e: float, upload: float) -> dict[str, object]:
    return {
        "broker": broker,
        "overhead_ms": overhead,
        "best_e2e_ms": e2e,
        "upload_MBps": upload,
        "upload_cap_mbit": 80.0,
    }


def test_the_tls_cost_compares_the_two_mosquittos_of_one_run() -> None:
    res = [_row("mosquitto", 2.0, 8.0, 9.0), _row("mosquitto-tls", 2.25, 10.0, 8.55)]
    (line,) = _tls_cost(res)
    assert "+0.25 ms overhead" in line
    assert "best e2e 1.25×" in line
    assert "upload at 80 Mbit/s 0.950×" in line


def test_no_tls_line_without_both_brokers() -> None:
    assert _tls_cost([_row("mosquitto", 2.0, 8.0, 9.0), _row("embedded", 3.0, 9.0, 8.0)]) == []


def _page(tmp_path: Path, upload: dict[str, Any]) -> tuple[str, list[str]]:
    results = tmp_path / "results"
    results.mkdir()
    (results / "upload.json").write_text(json.dumps(upload))
    doc = tmp_path / "docs" / "benchmarks.md"
    heads = build_report(results, doc, "iotoffload bench upload")
    return doc.read_text(), heads


_SETUP = {"scenario": "upload", "model": "resnet50", "network": "netns", "cpu_percent": 25}


def _old_run(planner: str, window: float, steady: float) -> dict[str, Any]:
    """A run as `bench upload` wrote it before horizons and package forms."""
    return {
        "planner": planner,
        "rate_mbit": 80.0,
        "cpu_percent": 25,
        "network": "netns",
        "rtt_ms": 10.0,
        "upload_s": 11.5,
        "bytes_uploaded": 102_000_000,
        "first_offload_s": 4.5,
        "steady_ms": steady,
        "mean_during_upload_ms": window,
        "queries": 50,
        "records": [],
    }


def test_an_old_upload_file_still_renders_with_dashes(tmp_path: Path) -> None:
    old = _SETUP | {
        "rtt_ms": 10.0,
        "runs": [_old_run("edge", 400.0, 150.0), _old_run("auto", 300.0, 150.0)],
    }
    text, heads = _page(tmp_path, old)
    assert "| 80.0 | edge | - | 11.5 | 4.5 | - | - | - | 400.0 | 150.0 | - | - | - | - |" in text
    assert heads == [
        "resnet50: 80 Mbit/s: auto vs edge during the upload window: 0.75× the latency"
    ]
    assert "Network: netns, device CPU 25%, model resnet50, RTT +10 ms." in text


def _new_run(label: str, **kw: Any) -> dict[str, Any]:
    planner = "auto" if label.startswith("upload-only") else label.split(":")[0]
    kind = "upload-only" if label.startswith("upload-only") else "queries"
    run = _old_run(planner, 0.0, 0.0) | {"label": label, "kind": kind, "horizon_s": 30.0}
    return run | {"upload_weights": "float32", "mean_during_upload_ms": None} | kw


def test_the_upload_section_shows_the_horizon_table_and_the_goals(tmp_path: Path) -> None:
    runs = [
        _new_run("upload-only", upload_MBps=10.0, upload_cpu_ms_per_MB=1.5, upload_s=10.2),
        _new_run("local", mean_first10_ms=400.0, mean_horizon_ms=400.0, first_offload_s=None),
        _new_run("edge:float32", mean_horizon_ms=300.0, upload_MBps=9.0),
        _new_run("ionn:float32", mean_horizon_ms=250.0, mean_first10_ms=410.0),
        _new_run(
            "auto",
            upload_weights="int8",
            upload_s=3.25,
            first_offload_s=1.25,
            mean_first10_ms=380.0,
            mean_horizon_ms=200.0,
            p95_horizon_ms=420.0,
            mean_during_upload_ms=350.0,
            steady_ms=150.0,
            upload_MBps=9.5,
            upload_cpu_ms_per_MB=2.25,
            behind_upload_p50_ms=1.0,
            behind_upload_p95_ms=2.5,
        ),
    ]
    new = _SETUP | {"horizon_s": 30.0, "first_window_s": 10.0, "runs": runs}
    text, heads = _page(tmp_path, new)
    assert "| mean 0–10 s | mean 0–30 s | p95 | window mean | steady | upload MB/s |" in text
    assert (
        "| 80.0 | auto | int8 | 3.2 | 1.2 | 380.0 | 200.0 | 420.0 | 350.0 | 150.0 | 9.50 | "
        "0.95 | 2.25 | 1.0 / 2.5 |"
    ) in text  # ×alone 9.5 / 10 from the fields (the file has no upload_vs_alone)
    assert "horizon 30 s from first contact" in text
    assert (
        "resnet50: 80 Mbit/s, 0–30 s: auto's mean 0.67× edge:float32 (goal ≤ 0.75: met), "
        "0.80× ionn:float32 (goal ≤ 0.85: met)"
    ) in heads
    assert (
        "resnet50: 80 Mbit/s, first 10 s vs local: ionn:float32 1.02×, auto 0.95× "
        "(goal ≤ 1.05: all met)"
    ) in heads
    assert "resnet50: 80 Mbit/s: auto's first offloaded query at 1.25 s; goal ≤ 2 s: met" in heads
    assert (
        "resnet50: 80 Mbit/s: device CPU per uploaded MB, upload-only (no queries): 1.50 ms "
        "(goal ≤ 2 ms: met)"
    ) in heads
    assert "## Headline ratios" in text and heads[0] in text


def test_each_model_uploaded_gets_its_own_section(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    runs = [_old_run("edge", 400.0, 150.0), _old_run("auto", 300.0, 150.0)]
    (results / "upload-resnet50.json").write_text(json.dumps(_SETUP | {"runs": runs}))
    other = _SETUP | {"model": "efficientnet-lite0", "runs": runs}
    (results / "upload-efficientnet-lite0.json").write_text(json.dumps(other))
    doc = tmp_path / "docs" / "benchmarks.md"
    heads = build_report(results, doc, "iotoffload bench upload")
    text = doc.read_text()
    assert "## Upload (IONN's experiment): resnet50" in text
    assert "## Upload (IONN's experiment): efficientnet-lite0" in text
    assert "![upload](benchmarks/upload-resnet50.png)" in text
    assert {h.split(":")[0] for h in heads} == {"resnet50", "efficientnet-lite0"}
