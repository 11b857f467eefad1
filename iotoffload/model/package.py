"""A model package on disk: a directory with ``manifest.json`` and the block files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iotoffload.model.errors import PackageError
from iotoffload.model.manifest import MANIFEST_NAME, BlockSpec, Manifest, sha256_file


@dataclass(frozen=True)
class ModelPackage:
    root: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def num_blocks(self) -> int:
        return self.manifest.num_blocks

    @property
    def blocks(self) -> list[BlockSpec]:
        return self.manifest.blocks

    def tflite_path(self, index: int) -> Path:
        return self.root / self.manifest.blocks[index].tflite

    def onnx_path(self, index: int) -> Path:
        return self.root / self.manifest.blocks[index].onnx

    def upload_path(self, index: int) -> Path:
        """The file an upload of block ``index`` sends (its ``encoding``'s bytes)."""
        b = self.manifest.blocks[index]
        return self.root / (b.upload.file if b.upload is not None else b.onnx)

    @classmethod
    def load(cls, root: Path, *, check_digests: bool = True) -> ModelPackage:
        """Load and (by default) verify every block file's sha256.

        Raises PackageError naming the offending file for anything missing, truncated or altered.
        """
        root = Path(root)
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            raise PackageError(f"{mpath}: no manifest (not a model package)")
        manifest = Manifest.from_json(mpath.read_bytes(), origin=str(mpath))
        pkg = cls(root, manifest)
        pkg._check_files(check_digests)
        return pkg

    def _check_files(self, check_digests: bool) -> None:
        for b in self.manifest.blocks:
            files = [(b.tflite, b.tflite_sha256), (b.onnx, b.onnx_sha256)]
            if b.upload is not None:
                files.append((b.upload.file, b.upload.sha256))
            for rel, digest in files:
                path = (self.root / rel).resolve()
                if not path.is_relative_to(self.root.resolve()):
                    raise PackageError(f"{rel}: block path leaves the package directory")
                if not path.is_file():
                    raise PackageError(f"{path}: block file missing (block {b.index})")
                # the upload's chunking counts on the size (checked even without digests)
                if (
                    b.upload is not None
                    and rel == b.upload.file
                    and (path.stat().st_size != b.upload.bytes)
                ):
                    raise PackageError(
                        f"{path}: {path.stat().st_size} bytes, the manifest says "
                        f"{b.upload.bytes} (block {b.index}): re-prepare the package"
                    )
                if check_digests and sha256_file(path) != digest:
                    raise PackageError(
                        f"{path}: sha256 mismatch (block {b.index}); the file is corrupted or "
                        "truncated: re-prepare the package"
                    )
