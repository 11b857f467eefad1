"""Signed models end to end: ``iotoffload model keygen`` and ``model sign`` on a real package,
a real DeviceAgent offloading it to an edge with ``require_signed``, and the same package
unsigned refused by that edge (nothing stored) while the device still answers locally."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.cli import app
from iotoffload.model import ModelPackage
from iotoffload.model.signing import check_package
from iotoffload.runtime import TFLiteExecutor
from tests.integration.conftest import Mosquitto

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    r = runner.invoke(app, ["model", "keygen", "--out", str(tmp_path / "keys")])
    assert r.exit_code == 0, r.output
    return tmp_path / "keys" / "model-signing.pem", tmp_path / "keys" / "model-signing.pub.pem"


@pytest.fixture
def signed(mobilenet: ModelPackage, tmp_path: Path, keys: tuple[Path, Path]) -> ModelPackage:
    """A copy of the test mobilenet signed with ``model sign`` (the shared one stays as is)."""
    shutil.copytree(mobilenet.root, tmp_path / "mobilenet")
    r = runner.invoke(app, ["model", "sign", str(tmp_path / "mobilenet"), "--key", str(keys[0])])
    assert r.exit_code == 0, r.output
    pkg = ModelPackage.load(tmp_path / "mobilenet")
    assert check_package(pkg).valid
    return pkg


@pytest.fixture
def edge(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[EdgeAgent]:
    with Mosquitto(tmp_path) as m:
        e = EdgeAgent(
            EdgeConfig(
                id="edge1",
                broker=m.url,
                store=tmp_path / "store",
                advertise=False,
                require_signed=True,
                trusted_keys=[keys[1]],
            )
        )
        e.start()
        try:
            yield e
        finally:
            e.stop()


def _device(pkg: ModelPackage, edge: EdgeAgent, who: str) -> DeviceAgent:
    assert edge.config.broker is not None
    return DeviceAgent(pkg, edge.config.broker, "edge1", device_id=who, split=9, deadline_ms=5000)


def test_a_signed_package_is_offloaded_to_a_require_signed_edge(
    signed: ModelPackage, edge: EdgeAgent
) -> None:
    dev = _device(signed, edge, "dev1")
    try:
        inv = dev.connect()
        assert inv is not None and inv.known
        dev.upload()
        assert not dev.upload_errors
        assert dev.inventory.stored == list(range(18))
        x = np.random.default_rng(0).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
        out = dev.query(x)
        assert out.offloaded, out.reason
        want = TFLiteExecutor.from_package(signed).run(0, 18, x)
        np.testing.assert_allclose(out.output, want, rtol=0, atol=1e-4 * float(want.max()))
    finally:
        dev.close()


def test_the_unsigned_package_is_refused_and_runs_locally(
    mobilenet: ModelPackage, edge: EdgeAgent
) -> None:
    assert check_package(mobilenet).signature is None
    dev = _device(mobilenet, edge, "dev2")
    try:
        assert dev.connect(timeout=2.0) is None  # refused: no inventory comes back
        assert edge.store.model_ids() == []
        out = dev.query(np.zeros((1, 224, 224, 3), np.float32))
        assert not out.offloaded
        assert out.output.shape == (1, 1000)
    finally:
        dev.close()
    assert not any((edge.config.store / "models").iterdir())
