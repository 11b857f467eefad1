"""Loading packages from disk: digests, missing files, hostile manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from iotoffload.model import ModelPackage, PackageError
from iotoffload.model.manifest import MANIFEST_NAME


@pytest.fixture
def pkg_copy(mobilenet: ModelPackage, tmp_path: Path) -> Path:
    dest = tmp_path / "pkg"
    shutil.copytree(mobilenet.root, dest)
    return dest


def test_intact_package_loads(pkg_copy: Path) -> None:
    pkg = ModelPackage.load(pkg_copy)
    assert pkg.num_blocks == 18
    assert pkg.onnx_path(3).name == "b03.onnx"


def test_tampered_block_is_detected_and_named(pkg_copy: Path) -> None:
    f = pkg_copy / "b05.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"b05\.onnx: sha256 mismatch \(block 5\)"):
        ModelPackage.load(pkg_copy)
    # without digest checks the same package loads (fast path for trusted caches)
    assert ModelPackage.load(pkg_copy, check_digests=False).num_blocks == 18


def test_truncated_block_is_detected(pkg_copy: Path) -> None:
    f = pkg_copy / "b17.tflite"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(PackageError, match=r"b17\.tflite: sha256 mismatch"):
        ModelPackage.load(pkg_copy)


def test_missing_file_is_refused_with_its_name(pkg_copy: Path) -> None:
    (pkg_copy / "b09.tflite").unlink()
    with pytest.raises(PackageError, match=r"b09\.tflite: block file missing \(block 9\)"):
        ModelPackage.load(pkg_copy)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no manifest"):
        ModelPackage.load(tmp_path)


def test_block_path_may_not_leave_the_package(pkg_copy: Path) -> None:
    m = json.loads((pkg_copy / MANIFEST_NAME).read_text())
    m["blocks"][0]["tflite"] = "../../etc/passwd"
    (pkg_copy / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(PackageError, match="leaves the package directory"):
        ModelPackage.load(pkg_copy)


def test_corrupt_manifest_names_the_file(pkg_copy: Path) -> None:
    (pkg_copy / MANIFEST_NAME).write_text('{"format": 1, "name": "x"')
    with pytest.raises(PackageError, match=r"manifest\.json: not valid JSON"):
        ModelPackage.load(pkg_copy)
