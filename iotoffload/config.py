"""Settings shared by every tool: read from the environment (``IOTOFFLOAD_*``).

Agent config files (edge.toml, device.toml) build on these models.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "iotoffload" / "models"


class ModelSettings(BaseSettings):
    """Where model packages live and how they are run locally."""

    model_config = SettingsConfigDict(env_prefix="IOTOFFLOAD_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Directory holding prepared model packages (one sub-directory per name).",
    )
    tflite_threads: int = Field(default=1, ge=1, le=64)
    onnx_threads: int = Field(default=1, ge=1, le=64)
    tflite_backend: str = Field(
        default="auto",
        pattern="^(auto|tflite-runtime|litert)$",
        description="Which TFLite interpreter to use; auto prefers tflite-runtime.",
    )


def settings_from_toml(path: Path | None, table: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``[table]`` of a TOML file, with the non-None ``overrides`` (flags) on top."""
    data: dict[str, Any] = {}
    if path is not None:
        with Path(path).open("rb") as f:
            data = dict(tomllib.load(f).get(table, {}))
    data.update({k: v for k, v in overrides.items() if v is not None})
    return data
