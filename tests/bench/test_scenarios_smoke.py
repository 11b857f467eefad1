"""CI smoke runs of the energy, overhead, load and scale scenarios (seconds, loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iotoffload.cli import app
from iotoffload.model import ModelPackage

pytestmark = pytest.mark.integration


@pytest.fixture
def env(mobilenet: ModelPackage, monkeypatch: pytest.MonkeyPatch) -> ModelPackage:
    monkeypatch.setenv("IOTOFFLOAD_CACHE_DIR", str(mobilenet.root.parent))
    return mobilenet


def _run(args: list[str]) -> None:
    r = CliRunner().invoke(app, ["bench", *args])
    assert r.exit_code == 0, r.output


def test_energy_smoke(env: ModelPackage, tmp_path: Path) -> None:
    _run(["energy", "--bandwidths", "5,80", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "energy.json").read_text())["rows"]
    assert len(rows) == 4
    for rate in (5.0, 80.0):
        lat, en = (
            next(r for r in rows if r["rate_mbit"] == rate and r["objective"] == o)
            for o in ("latency", "energy")
        )
        assert en["energy_mj"] <= lat["energy_mj"] + 1e-9
    assert (tmp_path / "energy.png").is_file()


def test_overhead_smoke(env: ModelPackage, tmp_path: Path) -> None:
    _run(
        [
            "overhead",
            "--brokers",
            "embedded",
            "--repeat",
            "3",
            "--splits",
            "0,17",
            "--out",
            str(tmp_path),
        ]
    )
    res = json.loads((tmp_path / "overhead.json").read_text())["results"][0]
    assert res["broker"] == "embedded" and len(res["splits"]) == 2 and res["broker_MBps"] > 1


def test_overhead_on_the_secured_broker_smoke(env: ModelPackage, tmp_path: Path) -> None:
    """The bench's own agents on the secured setup (TLS, certificates, the ACL): every query
    offloaded, the throughput probe through the ACL, the upload paced at the cap."""
    _run(
        [
            "overhead",
            "--brokers",
            "mosquitto-tls",
            "--repeat",
            "2",
            "--splits",
            "0",
            "--upload-mbit",
            "400",
            "--out",
            str(tmp_path),
        ]
    )
    res = json.loads((tmp_path / "overhead.json").read_text())["results"][0]
    assert res["broker"] == "mosquitto-tls" and res["broker_MBps"] > 1
    assert [r["offloaded"] for r in res["splits"]] == [1.0]
    assert res["upload_cap_mbit"] == 400 and 0 < res["upload_MBps"] <= 50 * 1.05


def test_load_and_scale_smoke(env: ModelPackage, tmp_path: Path) -> None:
    _run(["load", "--steps", "0,1", "--queries", "3", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "load.json").read_text())["rows"]
    assert {(r["background"], r["planner"]) for r in rows} == {
        (0, "loadpart"),
        (0, "neurosurgeon"),
        (1, "loadpart"),
        (1, "neurosurgeon"),
    }
    _run(["scale", "--devices", "1,4", "--seconds", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "scale.json").read_text())
    rows = res["rows"]
    # batching off, then on, each for every device count
    assert [(r["devices"], r["max_batch"]) for r in rows] == [(1, 1), (4, 1), (1, 8), (4, 8)]
    assert all(r["queries"] > 0 and r["errors"] == 0 and r["unanswered"] == 0 for r in rows)
    assert all(r["mean_batch"] == 1 for r in rows if r["max_batch"] == 1)
    # against ONNX Runtime alone on the same blocks, measured in the same run
    assert res["raw_qps"] > 0 and res["raw_batched_qps"] > 0 and res["workers"] >= 1
    assert rows[0]["vs_raw"] == rows[0]["qps"] / res["raw_qps"]
    assert (tmp_path / "load.png").is_file() and (tmp_path / "scale.png").is_file()


def test_load_and_scale_on_the_secured_broker(env: ModelPackage, tmp_path: Path) -> None:
    """Every bench device and the edge connect as their own identities through the ACL:
    a device without rights, or one speaking as another, would get no answer."""
    tls = ["--broker", "mosquitto-tls"]
    _run(["load", "--steps", "1", "--queries", "2", *tls, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "load.json").read_text())["rows"]
    assert {r["planner"] for r in rows} == {"loadpart", "neurosurgeon"}
    _run(["scale", "--devices", "1,3", "--seconds", "1", *tls, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert [r["devices"] for r in rows] == [1, 3, 1, 3]
    assert all(r["queries"] > 0 and r["errors"] == 0 for r in rows)


def test_report_page_from_one_run(env: ModelPackage, tmp_path: Path) -> None:
    res = tmp_path / "res"
    _run(["energy", "--bandwidths", "20", "--out", str(res)])
    _run(["scale", "--devices", "1", "--seconds", "0.5", "--out", str(res)])
    _run(["scale", "--devices", "1", "--seconds", "0.5", "--window", "3", "--out", str(res)])
    w = json.loads((res / "scale-window3.json").read_text())
    assert w["window"] == 3 and w["rows"][0]["queries"] > 0 and w["rows"][0]["unanswered"] == 0
    doc = tmp_path / "docs" / "benchmarks.md"
    _run(["report", "--results", str(res), "--doc", str(doc), "--command", "iotoffload bench x"])
    text = doc.read_text()
    assert "## Energy" in text and "## Scale" in text and "iotoffload bench x" in text
    assert "mean batch" in text and "raw ONNX Runtime batch 1" in text
    assert "## Scale (devices against one edge), 3 queries in flight per device" in text
    assert "scale, 3 queries in flight per device: one device" in text
    assert "benchmarks/scale-window3.png" in text
    assert "## Headline ratios" in text and "cores" in text
    assert (doc.parent / "benchmarks" / "energy.png").is_file()


def _handoff_args(out: Path, *extra: str) -> list[str]:
    """A short handoff run: 1 s on A, 3 s after the move, 10 queries/s, uplink uncapped."""
    base = ["handoff", "--rate", "10", "--before", "1", "--after", "3", "--uplink", "0"]
    return [*base, *extra, "--out", str(out)]


def test_handoff_smoke_every_way_loses_nothing(env: ModelPackage, tmp_path: Path) -> None:
    _run(_handoff_args(tmp_path))
    runs = {
        r["summary"]["mode"]: r for r in json.loads((tmp_path / "handoff.json").read_text())["runs"]
    }
    assert set(runs) == {"reupload", "transfer", "proactive", "proactive-upload"}
    full = sum(b.upload_bytes for b in env.blocks)
    n = env.num_blocks
    for mode, r in runs.items():
        m = r["summary"]
        assert m["lost"] == 0 and m["answered_twice"] == 0 and m["answered"] == m["queries"]
        assert m["no_offload_s"] is not None, mode  # back to offloading, on B
        assert r["records"][-1]["edge"] == "bench-b"
    assert runs["reupload"]["summary"]["device_bytes_to_b"] == full
    assert runs["transfer"]["summary"]["device_bytes_to_b"] == 0
    assert runs["transfer"]["summary"]["blocks_from_a"] == n
    assert runs["proactive"]["summary"]["blocks_from_a"] == n
    assert runs["proactive-upload"]["summary"]["device_bytes_to_b"] == full
    for mode in ("proactive", "proactive-upload"):  # B was full before the move
        assert runs[mode]["summary"]["local_after_move"] == 0
    assert (tmp_path / "handoff.png").is_file()
    doc = tmp_path / "benchmarks.md"
    _run(["report", "--results", str(tmp_path), "--doc", str(doc)])
    text = doc.read_text()
    assert "## Handoff" in text and "handoff transfer: 0 lost" in text


def test_handoff_smoke_on_the_secured_brokers(env: ModelPackage, tmp_path: Path) -> None:
    """Two secured mosquittos sharing one PKI and ACL: B fetches every block from A as
    itself through the ACL, the device sends B nothing, no query is lost."""
    _run(_handoff_args(tmp_path, "--modes", "transfer", "--broker", "mosquitto-tls"))
    (run,) = json.loads((tmp_path / "handoff.json").read_text())["runs"]
    m = run["summary"]
    assert m["lost"] == 0 and m["answered_twice"] == 0 and m["answered"] == m["queries"]
    assert m["blocks_from_a"] == env.num_blocks and m["device_bytes_to_b"] == 0
    assert run["records"][-1]["edge"] == "bench-b"
