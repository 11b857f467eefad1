"""The package cache: ``~/.cache/iotoffload/models/<name>/`` (``IOTOFFLOAD_CACHE_DIR``).

A package's float16 and int8 upload variants (``iotoffload.model.weights``) live beside it, as
``<name>@float16/`` and ``<name>@int8/``; a form refused for the package as it is now is kept as
``<name>@<form>.refused.json`` (with the agreement it measured), so ``auto`` measures it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iotoffload.config import ModelSettings
from iotoffload.model.build import prepare_catalog
from iotoffload.model.catalog import CATALOG
from iotoffload.model.errors import ModelError, PackageError
from iotoffload.model.manifest import MANIFEST_NAME, UPLOAD_FORMS, Agreement, UploadWeights
from iotoffload.model.package import ModelPackage
from iotoffload.model.progress import Progress, SilentProgress
from iotoffload.model.upload_files import needs_upload_files, with_upload_files
from iotoffload.model.weights import (
    AGREEMENT_THRESHOLD,
    DEFAULT_SAMPLES,
    FormChoice,
    UploadChoice,
    choose_form,
    load_variant,
    read_refusal,
    variant_dir,
)


@dataclass(frozen=True)
class FormState:
    """What the cache holds of one upload form of a package."""

    form: UploadWeights
    state: str  # "ready", "refused" or "none"
    agreement: Agreement | None = None


@dataclass
class ModelCache:
    root: Path

    @classmethod
    def from_settings(cls, settings: ModelSettings | None = None) -> ModelCache:
        return cls((settings or ModelSettings()).cache_dir)

    def path(self, name: str, form: UploadWeights = "float32") -> Path:
        return variant_dir(self.root / name, form)

    def names(self) -> list[str]:
        """The float32 packages (their variants are listed by ``forms``)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".") and "@" not in p.name and (p / MANIFEST_NAME).is_file()
        )

    def load(self, name: str, *, check_digests: bool = True) -> ModelPackage:
        return ModelPackage.load(self.path(name), check_digests=check_digests)

    def forms(self, base: ModelPackage) -> list[FormState]:
        """Each upload form of ``base``: ready (an intact variant of this very build), refused
        (with the figure), or not measured yet."""
        out = [FormState("float32", "ready")]
        for form in UPLOAD_FORMS[1:]:
            v = load_variant(base, form)
            if v is not None:
                out.append(FormState(form, "ready", v.manifest.agreement))
                continue
            r = read_refusal(base, form)
            out.append(FormState(form, "refused", r.agreement) if r else FormState(form, "none"))
        return out

    def resolve(
        self,
        ref: str,
        *,
        build: bool = True,
        progress: Progress | None = None,
        upload_weights: UploadChoice | None = None,
    ) -> ModelPackage:
        """A package by name (cache, building catalog models on first use) or by directory.

        ``upload_weights`` None gives the package as named; a form (or ``auto``) gives the
        named float32 package's variant of that form, derived on first use when ``build``.
        """
        if upload_weights is None:
            pkg = self._resolve_named(ref, build=build, progress=progress)
        else:
            pkg = self.choose(ref, upload_weights, build=build, progress=progress).package
        return self._current(pkg, build=build, progress=progress)

    def _current(
        self, pkg: ModelPackage, *, build: bool, progress: Progress | None
    ) -> ModelPackage:
        """A cached package built before encoded uploads existed gets its upload files (once,
        when building is allowed: a few seconds for ResNet-50); others are as they are."""
        if not build or not needs_upload_files(pkg):
            return pkg
        if not pkg.root.resolve().is_relative_to(self.root.resolve()):
            return pkg  # the user's own directory: not ours to write into
        (progress or SilentProgress()).info(f"{pkg.name}: adding the encoded upload files")
        return with_upload_files(pkg, progress)

    def choose(
        self,
        ref: str,
        upload_weights: UploadChoice,
        *,
        build: bool = True,
        force: bool = False,
        threshold: float = AGREEMENT_THRESHOLD,
        samples: int = DEFAULT_SAMPLES,
        progress: Progress | None = None,
    ) -> FormChoice:
        """The package to upload for ``ref`` in ``upload_weights``, and why that one (``auto``
        says which form it took and what the others measured)."""
        pkg = self._resolve_named(ref, build=build, progress=progress)
        form = pkg.manifest.upload_weights
        if form != "float32" and upload_weights == form:
            return FormChoice(pkg, form, f"{form}: the package named is one")
        return choose_form(
            pkg,
            upload_weights,
            build=build,
            force=force,
            threshold=threshold,
            samples=samples,
            progress=progress,
        )

    def _resolve_named(self, ref: str, *, build: bool, progress: Progress | None) -> ModelPackage:
        as_path = Path(ref).expanduser()
        if (as_path / MANIFEST_NAME).is_file():
            return ModelPackage.load(as_path)
        if (self.root / ref / MANIFEST_NAME).is_file():
            return ModelPackage.load(self.root / ref)
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
