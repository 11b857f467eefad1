"""Device agent configuration: ``configs/device.toml``, ``IOTOFFLOAD_DEVICE_*`` and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from device_agent.handoff import HandoffPolicy
from iotoffload.config import settings_from_toml
from iotoffload.ids import ID_PATTERN, is_id
from iotoffload.transport.topics import DEFAULT_PREFIX


class DeviceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IOTOFFLOAD_DEVICE_", extra="forbid")

    id: str | None = Field(default=None, pattern=ID_PATTERN)
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
    chunk_bytes: int = Field(
        default=960 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="the largest upload chunk (chunks are sized to the link below it; the "
        "default and its frame header fit a 1 MiB broker packet cap)",
    )
    upload_weights: str = Field(
        default="auto",
        pattern="^(auto|float32|float16|int8)$",
        description="the form of the weights uploaded: auto = the smallest whose top-1 "
        "agreement with float32 the package build verified (>= 99 %)",
    )
    tflite_threads: int = Field(default=1, ge=1, le=64)
    # who this device trusts (protocol v2: identities are topic levels the broker vouches for)
    edges: list[str] = Field(
        default_factory=lambda: ["*"],
        description="edge ids this device may use and move to; '*' any edge on the broker",
    )
    operators: list[str] = Field(
        default_factory=lambda: ["*"],
        description="who may command it on its control topic; '*' anyone the broker's ACL lets",
    )
    # handoff between edges
    handoff: bool = Field(default=True, description="move to a better edge on my own")
    prefer: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="stay on this edge whenever it is online",
    )
    handoff_margin: float = Field(
        default=0.2, ge=0, lt=1, description="another edge must be predicted this much faster"
    )
    handoff_dwell_s: float = Field(default=3.0, ge=0, description="… for this long in a row")
    handoff_hold_s: float = Field(default=5.0, ge=0, description="no policy move after a move")
    handoff_rtt_ms: float = Field(default=250.0, gt=0, description="move when the RTT exceeds")
    handoff_misses: int = Field(default=3, ge=1, description="move after this many misses")
    transfer: bool = Field(default=True, description="new edge fetches blocks from the old one")
    proactive: bool = Field(default=False, description="fill the likely next edge beforehand")
    proactive_mbps: float = Field(default=8.0, gt=0, description="cap of a proactive upload")
    upload_mbps: float | None = Field(default=None, gt=0, description="cap of the upload")

    @field_validator("edges", "operators")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        for x in v:
            if x != "*" and not is_id(x):
                raise ValueError(f"{x!r} is neither an id ({ID_PATTERN}) nor '*'")
        return v

    def policy(self) -> HandoffPolicy | None:
        if not self.handoff:
            return None
        return HandoffPolicy(
            margin=self.handoff_margin,
            dwell_s=self.handoff_dwell_s,
            rtt_limit_ms=self.handoff_rtt_ms,
            miss_limit=self.handoff_misses,
            hold_s=self.handoff_hold_s,
        )

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> DeviceConfig:
        return cls(**settings_from_toml(path, "device", overrides))
