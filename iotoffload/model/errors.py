"""Errors raised while building, cutting or loading model packages."""

from __future__ import annotations


class ModelError(Exception):
    """Base class: every message is meant to be shown to a user as it is."""


class PackageError(ModelError):
    """A package on disk is missing, malformed, corrupted or truncated."""


class BuildError(ModelError):
    """A package could not be built (conversion failed, dependency missing, ...)."""


class CutError(ModelError):
    """A user's model pair could not be cut into matching blocks."""


class VerificationError(ModelError):
    """A built package does not reproduce the whole model at some split point."""


class MissingDependencyError(ModelError):
    """An optional dependency (an extra) is needed for this operation."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} needs the '{extra}' extra: pip install 'iotoffload[{extra}]'")
        self.extra = extra
