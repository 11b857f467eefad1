"""Device agent configuration: ``configs/device.toml``, ``IOTOFFLOAD_DEVICE_*`` and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from iotoffload.config import settings_from_toml
from iotoffload.transport.topics import DEFAULT_PREFIX


class DeviceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IOTOFFLOAD_DEVICE_", extra="forbid")

    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: str = "mobilenet"
    broker: str | None = Field(default=None, description="mqtt://HOST:PORT; none: discover")
    edge: str = Field(default="auto", description="edge id, or auto (discovery / status)")
    interface: str = Field(default="127.0.0.1", description="address zeroconf browses on")
    discovery_timeout: float = Field(default=3.0, gt=0)
    prefix: str = DEFAULT_PREFIX
    protocol: int = Field(default=5, description="MQTT protocol: 5 or 311")
    split: str = Field(default="auto", pattern=r"^(auto|\d+)$")
    planner: str = Field(
        default="auto",
        description="auto | local | edge | neurosurgeon | ionn | efficiency | loadpart",
    )
    objective: str = Field(default="latency", pattern="^(latency|energy|mix)$")
    min_local: int = Field(default=0, ge=0, description="blocks that always run on the device")
    edge_speed: float = Field(
        default=1.0,
        gt=0,
        description="edge ÷ device speed, until the edge reports its own block times",
    )
    deadline_ms: float | None = Field(default=None, gt=0, description="per-query; auto if unset")
    chunk_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)
    tflite_threads: int = Field(default=1, ge=1, le=64)

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> DeviceConfig:
        return cls(**settings_from_toml(path, "device", overrides))
