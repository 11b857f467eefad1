"""A package's upload files: each ONNX block losslessly encoded where that pays (``block_codec``).

Written when a package is built (``build``, ``weights.derive_variant``) or, for a package built
before encoded uploads existed, by ``add_upload_files`` (``iotoffload model prepare`` runs it on
a cached package): a device only reads the file, so the upload costs it no CPU for the encoding.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from iotoffload.model.block_codec import SUFFIX, best_encoding
from iotoffload.model.manifest import MANIFEST_NAME, BlockSpec, BlockUpload
from iotoffload.model.package import ModelPackage
from iotoffload.model.progress import Progress, SilentProgress


def encode_blocks(root: Path, blocks: list[BlockSpec], progress: Progress) -> list[BlockSpec]:
    """``blocks`` (files under ``root``) with their upload files written next to the .onnx."""
    import hashlib

    out: list[BlockSpec] = []
    progress.start(len(blocks), "encoding ONNX blocks for the upload (lossless)")
    for b in blocks:
        data = (root / b.onnx).read_bytes()
        enc, encoded = best_encoding(data)
        upload = None
        if enc != "identity":
            name = b.onnx + SUFFIX[enc]
            _write(root / name, encoded)
            upload = BlockUpload(
                encoding=enc,
                file=name,
                sha256=hashlib.sha256(encoded).hexdigest(),
                bytes=len(encoded),
            )
        out.append(b.model_copy(update={"upload": upload}))
        progress.advance(f"block {b.index}: {enc}, {len(encoded) / max(1, len(data)):.0%}")
    return out


# written when no block of a package gained an upload file (nothing compresses): not again
CHECKED_NAME = ".upload-files-checked"


def needs_upload_files(pkg: ModelPackage) -> bool:
    """True for a package built before encoded uploads existed (no block has one, and it was
    not found to need none)."""
    return all(b.upload is None for b in pkg.blocks) and not (pkg.root / CHECKED_NAME).exists()


def with_upload_files(pkg: ModelPackage, progress: Progress | None = None) -> ModelPackage:
    """``pkg``, its upload files added first when it was built before they existed."""
    return add_upload_files(pkg, progress) if needs_upload_files(pkg) else pkg


def add_upload_files(pkg: ModelPackage, progress: Progress | None = None) -> ModelPackage:
    """Write ``pkg``'s upload files and record them in its manifest (replaced atomically: a
    crash leaves the old manifest, which does not name the new files)."""
    progress = progress or SilentProgress()
    blocks = encode_blocks(pkg.root, pkg.blocks, progress)
    if all(b.upload is None for b in blocks):
        _write(pkg.root / CHECKED_NAME, b"")
        return pkg
    manifest = pkg.manifest.model_copy(update={"blocks": blocks})
    _write(pkg.root / MANIFEST_NAME, manifest.to_json().encode())
    return ModelPackage.load(pkg.root)


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
