"""Edge agent configuration: ``configs/edge.toml``, ``IOTOFFLOAD_EDGE_*`` and CLI flags."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from iotoffload.config import settings_from_toml
from iotoffload.ids import ID_PATTERN, is_id
from iotoffload.transport.topics import DEFAULT_PREFIX


def _default_store() -> Path:
    return Path.home() / ".local" / "share" / "iotoffload" / "edge-store"


class EdgeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IOTOFFLOAD_EDGE_", extra="forbid")

    id: str = Field(
        default_factory=lambda: f"edge-{socket.gethostname()}"[:64],
        pattern=ID_PATTERN,
    )
    broker: str | None = Field(
        default=None, description="mqtt://HOST:PORT; none starts the embedded broker"
    )
    embedded_broker_port: int = 1883
    interface: str = Field(default="127.0.0.1", description="address to bind/advertise on")
    advertise: bool = True
    store: Path = Field(default_factory=_default_store)
    prefix: str = DEFAULT_PREFIX
    protocol: int = Field(default=5, description="MQTT protocol: 5 or 311")
    threads: int = Field(default=1, ge=1, le=64, description="ONNX Runtime intra-op threads")
    workers: int = Field(default=1, ge=1, le=16, description="queries executed in parallel")
    max_block_bytes: int = 64 * 1024 * 1024
    status_interval: float = Field(default=2.0, gt=0)
    peer_brokers: list[str] = Field(
        default_factory=list,
        description="brokers of peer edges this edge may pull blocks from at a handoff, besides "
        "its own; '*' allows any",
    )
    peer_edges: list[str] = Field(
        default_factory=list,
        description="edges this edge exchanges blocks with at a handoff (pushes to, pulls "
        "from), by id; '*' allows any edge the broker lets publish",
    )
    transfer_chunk_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)

    @field_validator("peer_edges")
    @classmethod
    def _peer_ids(cls, v: list[str]) -> list[str]:
        for x in v:
            if x != "*" and not is_id(x):
                raise ValueError(f"{x!r} is neither an edge id ({ID_PATTERN}) nor '*'")
        return v

    @field_validator("store")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(v).expanduser()

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> EdgeConfig:
        return cls(**settings_from_toml(path, "edge", overrides))
