"""A package's encoded upload files: written at build, checked at load, added to older
packages by the cache, and each decodes to its ONNX block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from iotoffload.model import ModelPackage, PackageError
from iotoffload.model.block_codec import decode
from iotoffload.model.cache import ModelCache
from iotoffload.model.manifest import MANIFEST_NAME
from iotoffload.model.upload_files import add_upload_files, needs_upload_files


def _strip_uploads(root: Path) -> None:
    """The package as built before encoded uploads existed."""
    m = json.loads((root / MANIFEST_NAME).read_text())
    for b in m["blocks"]:
        if b.pop("upload", None):
            (root / (b["onnx"] + ".s4z")).unlink(missing_ok=True)
            (root / (b["onnx"] + ".s2z")).unlink(missing_ok=True)
    (root / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.fixture
def pkg_copy(mobilenet: ModelPackage, tmp_path: Path) -> Path:
    dest = tmp_path / "pkg"
    shutil.copytree(mobilenet.root, dest)
    return dest


def test_the_blocks_with_weights_upload_encoded_and_decode_to_their_onnx(
    mobilenet: ModelPackage,
) -> None:
    encoded = [b for b in mobilenet.blocks if b.upload is not None]
    assert len(encoded) >= mobilenet.num_blocks - 2  # every block but weightless ones
    onnx = sum(b.onnx_bytes for b in mobilenet.blocks)
    sent = sum(b.upload_bytes for b in mobilenet.blocks)
    assert sent < 0.9 * onnx  # float32 weights: about 15 % fewer bytes
    for b in encoded:
        assert b.encoding in ("shuffle4-zlib", "shuffle2-zlib")  # whichever is smaller
        data = mobilenet.upload_path(b.index).read_bytes()
        assert len(data) == b.upload_bytes < b.onnx_bytes
        assert decode(data, b.encoding, b.onnx_bytes) == mobilenet.onnx_path(b.index).read_bytes()


def test_a_tampered_upload_file_is_detected(pkg_copy: Path) -> None:
    pkg = ModelPackage.load(pkg_copy)
    b = next(b for b in pkg.blocks if b.upload is not None)
    f = pkg.upload_path(b.index)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"\.s[24]z: sha256 mismatch"):
        ModelPackage.load(pkg_copy)
    f.write_bytes(bytes(data[:-1]))  # a size the chunking would miscount: even unchecked
    with pytest.raises(PackageError, match="the manifest says"):
        ModelPackage.load(pkg_copy, check_digests=False)


def test_an_older_package_gets_its_upload_files_and_keeps_its_model_id(pkg_copy: Path) -> None:
    before = ModelPackage.load(pkg_copy)
    _strip_uploads(pkg_copy)
    old = ModelPackage.load(pkg_copy)
    assert needs_upload_files(old)
    assert '"upload"' not in old.manifest.to_json()  # its JSON is as before uploads existed
    new = add_upload_files(old)
    assert not needs_upload_files(new)
    assert new.manifest.model_id == before.manifest.model_id
    assert [b.upload for b in new.blocks] == [b.upload for b in before.blocks]
    assert not needs_upload_files(ModelPackage.load(pkg_copy))  # written to disk


def test_the_cache_adds_upload_files_to_its_own_packages_only(
    pkg_copy: Path, tmp_path: Path
) -> None:
    cache = ModelCache(tmp_path / "cache")
    cached = cache.root / "mobilenet"
    shutil.copytree(pkg_copy, cached)
    _strip_uploads(cached)
    _strip_uploads(pkg_copy)
    assert not needs_upload_files(cache.resolve("mobilenet"))
    assert needs_upload_files(cache.resolve(str(pkg_copy)))  # the user's directory: untouched
    _strip_uploads(cached)
    assert needs_upload_files(cache.resolve("mobilenet", build=False))  # no writing asked


def test_a_package_where_nothing_compresses_is_not_encoded_again(
    pkg_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import iotoffload.model.upload_files as uf

    _strip_uploads(pkg_copy)
    calls: list[int] = []

    def nothing_pays(data: bytes | memoryview) -> tuple[str, bytes]:
        calls.append(len(data))
        return "identity", bytes(data)

    monkeypatch.setattr(uf, "best_encoding", nothing_pays)
    pkg = ModelPackage.load(pkg_copy)
    assert needs_upload_files(pkg)
    add_upload_files(pkg)
    assert len(calls) == pkg.num_blocks
    again = ModelPackage.load(pkg_copy)
    assert all(b.upload is None for b in again.blocks)
    assert not needs_upload_files(again)  # checked once: not re-encoded on every resolve
