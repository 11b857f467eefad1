from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iotoffload.cli import app
from iotoffload.model import ModelPackage

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture
def env(mobilenet: ModelPackage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(mobilenet.root, tmp_path / "models" / "mobilenet")
    monkeypatch.setenv("IOTOFFLOAD_CACHE_DIR", str(tmp_path / "models"))
    return tmp_path


def test_plan_json_compares_every_planner(env: Path) -> None:
    r = runner.invoke(
        app,
        [
            "plan",
            "--bandwidth",
            "50mbit",
            "--rtt",
            "5ms",
            "--edge-speed",
            "10",
            "--device-slowdown",
            "10",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    by = {p["planner"]: p for p in out["planners"]}
    assert set(by) == {"auto", "local", "edge", "neurosurgeon", "ionn", "efficiency", "loadpart"}
    for name, p in by.items():
        if name != "local":
            assert sorted(p["order"]) == list(range(18)), name
        assert len(p["steps"]) == len(p["order"]) + 1
    assert by["local"]["final"] == "D[0,18)"
    # a 10x slower device on 50 Mbit/s: offloading pays, and the incremental planners start
    # offloading before the split planners that wait for the whole rear part
    assert by["auto"]["final_ms"] < by["local"]["final_ms"]
    assert by["ionn"]["first_offload_ms"] <= by["neurosurgeon"]["first_offload_ms"]
    assert by["auto"]["mean_ms_during_upload"] <= by["neurosurgeon"]["mean_ms_during_upload"]


def test_plan_table_for_one_planner_and_bad_input(env: Path) -> None:
    r = runner.invoke(app, ["plan", "--planner", "ionn", "--bandwidth", "10mbit"])
    assert r.exit_code == 0, r.output
    assert "plan after each upload step" in r.output
    r = runner.invoke(app, ["plan", "--bandwidth", "fast"])
    assert r.exit_code == 2 and "bandwidth 'fast'" in r.output
    r = runner.invoke(app, ["plan", "--planner", "magic"])
    assert r.exit_code == 2 and "unknown planner" in r.output
