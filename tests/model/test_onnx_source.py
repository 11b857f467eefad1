"""prepare --onnx: a user's ONNX model (built here with PyTorch) cut and converted per block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from iotoffload.model import CutError, ModelPackage
from iotoffload.model.onnx_source import prepare_onnx
from iotoffload.runtime import OnnxExecutor, TFLiteExecutor

pytestmark = pytest.mark.integration
torch = pytest.importorskip("torch")


class Tiny(torch.nn.Module):  # type: ignore[misc]
    """NCHW conv net: stem, a residual block, a stride-2 block, a head — with a ZeroPad2d."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, 2), nn.ReLU6())
        self.res = nn.Sequential(nn.Conv2d(8, 24, 1), nn.ReLU6(), nn.Conv2d(24, 8, 1))
        self.down = nn.Sequential(nn.Conv2d(8, 32, 3, 2, 1), nn.ReLU6(), nn.Conv2d(32, 12, 1))
        self.head = nn.Sequential(
            nn.Conv2d(12, 48, 1),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(48, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.res(x)
        return self.head(self.down(x))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = Tiny().eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 32, 32),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
    )
    return path


@pytest.mark.parametrize(("policy", "min_blocks"), [("narrow", 2), ("all", 6)])
def test_every_split_of_a_user_onnx_model_agrees(
    tiny_onnx: Path, tmp_path: Path, policy: str, min_blocks: int
) -> None:
    pkg = prepare_onnx(tiny_onnx, "tiny", tmp_path / "tiny", policy=policy)  # type: ignore[arg-type]
    assert pkg.num_blocks >= min_blocks
    assert pkg.blocks[0].input.shape == (1, 32, 32, 3)  # NHWC at the boundary
    assert pkg.blocks[-1].output.shape == (1, 10)
    v = pkg.manifest.verification
    assert v is not None and v.max_rel_error < 1e-4 and v.reference == "whole ONNX model"
    x = np.random.default_rng(3).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    tfl, ort = TFLiteExecutor.from_package(pkg), OnnxExecutor.from_package(pkg)
    whole = ort.run(0, pkg.num_blocks, x)
    for k in range(pkg.num_blocks + 1):
        y = ort.run(k, pkg.num_blocks, tfl.run(0, k, x))
        assert np.max(np.abs(y - whole)) <= 1e-4 * np.max(np.abs(whole)), k
    assert ModelPackage.load(pkg.root).manifest.weights == "user"


def test_unreadable_onnx_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(CutError, match=r"bad\.onnx: not a readable ONNX model"):
        prepare_onnx(bad, "bad", tmp_path / "bad")


def tiny_factory() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def test_prepare_a_pytorch_module_from_the_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from iotoffload.cli import app

    r = CliRunner().invoke(
        app,
        [
            "model",
            "prepare",
            "--torch",
            "tests.model.test_onnx_source:tiny_factory",
            "--input-shape",
            "1,3,32,32",
            "--name",
            "tiny-torch",
            "--cache-dir",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    pkg = ModelPackage.load(tmp_path / "tiny-torch")
    assert pkg.manifest.source == "torch:tests.model.test_onnx_source:tiny_factory"
    assert pkg.manifest.verification is not None
    assert pkg.blocks[0].input.shape == (1, 32, 32, 3)
    r = CliRunner().invoke(
        app,
        [
            "model",
            "prepare",
            "--torch",
            "no.such.module:f",
            "--name",
            "x",
            "--cache-dir",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 2 and "PyTorch export failed" in r.output
