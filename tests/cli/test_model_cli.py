from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from iotoffload.cli import app
from iotoffload.model import ModelPackage

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture
def cache(mobilenet: ModelPackage, tmp_path: Path) -> Path:
    shutil.copytree(mobilenet.root, tmp_path / "mobilenet")
    return tmp_path


def test_list_and_show(cache: Path) -> None:
    r = runner.invoke(app, ["model", "list", "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    assert "mobilenet" in r.output and "seeded" in r.output
    r = runner.invoke(app, ["model", "show", "mobilenet", "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    assert "7×7×320" in r.output and "random weights" in r.output
    r = runner.invoke(app, ["model", "show", "mobilenet", "--json", "--cache-dir", str(cache)])
    assert json.loads(r.output)["name"] == "mobilenet"


def test_list_available_shows_the_catalog(cache: Path) -> None:
    r = runner.invoke(app, ["model", "list", "--available", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "MobileNetV2" in r.output


def test_run_prints_top5_and_block_times(cache: Path) -> None:
    r = runner.invoke(
        app,
        [
            "model",
            "run",
            "mobilenet",
            "--split",
            "7",
            "--repeat",
            "2",
            "--json",
            "--cache-dir",
            str(cache),
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["split"] == 7 and len(out["top5"]) == 5 and len(out["block_ms"]) == 18
    scores = [t["score"] for t in out["top5"]]
    assert scores == sorted(scores, reverse=True)


def test_run_on_npy_and_image_inputs(cache: Path, tmp_path: Path) -> None:
    from PIL import Image

    x = np.random.default_rng(1).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    img = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (300, 400, 3), np.uint8)).save(img)
    for inp in (str(tmp_path / "x.npy"), str(img)):
        r = runner.invoke(
            app,
            [
                "model",
                "run",
                "mobilenet",
                "--input",
                inp,
                "--split",
                "0",
                "--repeat",
                "1",
                "--json",
                "--cache-dir",
                str(cache),
            ],
        )
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model", "run", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["model", "run", "mobilenet", "--split", "99"], "--split must be within 0..18"),
        (["model", "run", "mobilenet", "--input", "/nonexistent.png"], "no such file"),
        (["model", "show", "nosuchmodel"], "unknown model"),
        (["model", "prepare", "resnet9000"], "not in the catalog"),
        (["model", "prepare", "--tflite", "a.tflite"], "needs --tflite, --onnx and --name"),
    ],
)
def test_user_errors_are_one_clear_line(cache: Path, args: list[str], message: str) -> None:
    r = runner.invoke(app, [*args, "--cache-dir", str(cache)])
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output


def test_verify_detects_tampering(cache: Path) -> None:
    r = runner.invoke(app, ["model", "verify", "mobilenet", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "ok" in r.output
    f = cache / "mobilenet" / "b02.onnx"
    f.write_bytes(f.read_bytes()[:-10])
    r = runner.invoke(app, ["model", "verify", "mobilenet", "--cache-dir", str(cache)])
    assert r.exit_code == 2 and "b02.onnx" in r.output
