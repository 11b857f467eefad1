"""Shared fixtures. Built model packages are made once per session (or reused from
$IOTOFFLOAD_TEST_MODELS, a developer's convenience: CI always builds them fresh).

Every test fails if it leaves threads or open zeroconf instances behind (tests/_leaks.py;
opt out with ``@pytest.mark.allow_leaks("reason")``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iotoffload.model import CATALOG, ModelPackage, PackageError, prepare_catalog
from iotoffload.model.upload_files import with_upload_files
from tests._leaks import LeakChecker

pytest_plugins = ["pytester"]

# Every network-facing piece binds to loopback in tests: set once here so no test can forget.
os.environ["IOTOFFLOAD_INTERFACE"] = "127.0.0.1"


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(LeakChecker(), "iotoffload-leak-checker")


KERAS_MOBILENET_CUTS = [
    "expanded_conv_project_BN",
    "block_1_project_BN",
    "block_2_add",
    "block_3_project_BN",
    "block_4_add",
    "block_5_add",
    "block_6_project_BN",
    "block_7_add",
    "block_8_add",
    "block_9_add",
    "block_10_project_BN",
    "block_11_add",
    "block_12_add",
    "block_13_project_BN",
    "block_14_add",
    "block_15_add",
    "block_16_project_BN",
    "predictions",
]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("IOTOFFLOAD_TEST_MODELS")
    if env:
        p = Path(env)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mobilenet(models_dir: Path) -> ModelPackage:
    """The catalog mobilenet (seeded weights) plus its whole-model pair in ``whole/``."""
    dest, whole = models_dir / "mobilenet", models_dir / "whole"
    try:
        pkg = ModelPackage.load(dest)
        if (whole / "model.tflite").is_file() and (whole / "model.onnx").is_file():
            return _current(pkg)
    except PackageError:
        pass
    return prepare_catalog(
        CATALOG["mobilenet"], dest, weights="seeded", export_whole=whole, force=True
    )


@pytest.fixture(scope="session")
def whole_pair(mobilenet: ModelPackage) -> tuple[Path, Path]:
    whole = mobilenet.root.parent / "whole"
    return whole / "model.tflite", whole / "model.onnx"


@pytest.fixture(scope="session")
def efficientnet(models_dir: Path) -> ModelPackage:
    """efficientnet-lite0 with its real ImageNet weights (PyTorch -> ONNX -> onnx2tf)."""
    dest = models_dir / "efficientnet-lite0"
    try:
        return _current(ModelPackage.load(dest))
    except PackageError:
        return prepare_catalog(CATALOG["efficientnet-lite0"], dest, force=True)


def _current(pkg: ModelPackage) -> ModelPackage:
    """A package reused from IOTOFFLOAD_TEST_MODELS built before encoded uploads existed gets
    them, as the model cache does (a fresh build has them)."""
    return with_upload_files(pkg)
