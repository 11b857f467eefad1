"""The package cache: ``~/.cache/iotoffload/models/<name>/`` (``IOTOFFLOAD_CACHE_DIR``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iotoffload.config import ModelSettings
from iotoffload.model.build import prepare_catalog
from iotoffload.model.catalog import CATALOG
from iotoffload.model.errors import ModelError, PackageError
from iotoffload.model.manifest import MANIFEST_NAME
from iotoffload.model.package import ModelPackage
from iotoffload.model.progress import Progress


@dataclass
class ModelCache:
    root: Path

    @classmethod
    def from_settings(cls, settings: ModelSettings | None = None) -> ModelCache:
        return cls((settings or ModelSettings()).cache_dir)

    def path(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        )

    def load(self, name: str, *, check_digests: bool = True) -> ModelPackage:
        return ModelPackage.load(self.path(name), check_digests=check_digests)

    def resolve(
        self, ref: str, *, build: bool = True, progress: Progress | None = None
    ) -> ModelPackage:
        """A package by name (cache, building catalog models on first use) or by directory."""
        as_path = Path(ref).expanduser()
        if (as_path / MANIFEST_NAME).is_file():
            return ModelPackage.load(as_path)
        if (self.path(ref) / MANIFEST_NAME).is_file():
            return self.load(ref)
        entry = CATALOG.get(ref)
        if entry is None:
            known = sorted(set(self.names()) | set(CATALOG))
            raise PackageError(
                f"unknown model {ref!r}: not a package directory, not in the cache "
                f"({self.root}) and not in the catalog; known: {', '.join(known) or 'none'}"
            )
        if not build:
            raise ModelError(f"model {ref!r} is not prepared yet: iotoffload model prepare {ref}")
        return prepare_catalog(entry, self.path(ref), progress=progress)
