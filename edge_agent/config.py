"""Edge agent configuration: ``configs/edge.toml``, ``IOTOFFLOAD_EDGE_*`` and CLI flags."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from iotoffload.config import settings_from_toml
from iotoffload.ids import ID_PATTERN, PROVIDER_PATTERN, is_id
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
    workers: int = Field(
        default=0,
        ge=0,
        le=16,
        description="query worker processes (batches executed in parallel); 0: one per core "
        "the edge may use, less one for its network and the broker (at least 1)",
    )
    max_batch: int = Field(
        default=8,
        ge=1,
        le=64,
        description="queries for the same model and blocks run together (from any devices); "
        "1: no batching",
    )
    batch_delay_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="how long a worker waits for more queries to fill a batch; 0: batches "
        "form only from queries already queued (under load), adding no wait",
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        max_length=8,
        description="ONNX Runtime execution providers of the workers' sessions, in order of "
        "preference (e.g. CUDAExecutionProvider, CPUExecutionProvider); checked at start",
    )
    max_block_bytes: int = 64 * 1024 * 1024
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve Prometheus metrics on this port (/metrics; 0: a free port); none: off",
    )
    metrics_address: str = Field(
        default="127.0.0.1", description="address the metrics endpoint listens on"
    )
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

    # hardening (README "Hardening"): every limit an uploaded block or a device meets
    worker_memory_mb: int = Field(
        default=3072,
        ge=256,
        description="address-space cap (RLIMIT_AS) of each ONNX Runtime worker process",
    )
    run_time_limit_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="one query run (or a profile): past it the "
        "worker is killed and the block quarantined",
    )
    load_time_limit_s: float = Field(
        default=60.0, gt=0, le=3600, description="loading and profiling one new block"
    )
    max_tensor_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="screening: the largest tensor a block may compute (static shapes)",
    )
    max_loop_iterations: int = Field(
        default=100_000, ge=1, description="screening: a constant Loop trip count above it"
    )
    store_max_bytes: int = Field(
        default=20 * 1024**3, ge=1024, description="the block store in total (then LRU eviction)"
    )
    device_max_bytes: int = Field(
        default=4 * 1024**3, ge=1024, description="blocks and partial uploads per device"
    )
    device_max_models: int = Field(default=32, ge=1, description="models announced per device")
    max_chunks: int = Field(default=4096, ge=1, le=65536, description="chunks per block")
    partial_expiry_s: float = Field(
        default=3600.0, gt=0, description="an unfinished upload untouched this long is dropped"
    )
    queue_per_device: int = Field(default=32, ge=1, description="queued queries per device")
    queue_total: int = Field(default=256, ge=1, description="queued queries in total")
    queue_max_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024, description="tensor bytes of queued queries in total"
    )
    max_deadline_ms: float = Field(
        default=30_000.0, gt=0, description="a query's deadline is cut to this"
    )
    status_max_models: int = Field(
        default=64, ge=0, description="models listed in the retained status (then counts only)"
    )
    require_signed: bool = Field(
        default=False, description="serve only models signed by one of trusted_keys"
    )
    trusted_keys: list[Path] = Field(
        default_factory=list, description="ed25519 public keys (PEM) whose signatures it trusts"
    )

    @field_validator("peer_edges")
    @classmethod
    def _peer_ids(cls, v: list[str]) -> list[str]:
        for x in v:
            if x != "*" and not is_id(x):
                raise ValueError(f"{x!r} is neither an edge id ({ID_PATTERN}) nor '*'")
        return v

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, v: list[str]) -> list[str]:
        # availability needs ONNX Runtime: checked when the edge starts (check_providers)
        for p in v:
            if not re.fullmatch(PROVIDER_PATTERN, p):
                raise ValueError(f"{p!r} is not an ONNX Runtime provider name (…ExecutionProvider)")
        if len(set(v)) != len(v):
            raise ValueError(f"providers named twice: {v}")
        return v

    @field_validator("store")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(v).expanduser()

    @field_validator("trusted_keys")
    @classmethod
    def _expand_keys(cls, v: list[Path]) -> list[Path]:
        return [Path(p).expanduser() for p in v]

    @property
    def worker_count(self) -> int:
        """The query workers to run: ``workers``, or for 0 the cores this process may use
        less one (the network thread, the loader and a local broker need a core; a worker
        runs its ONNX Runtime sessions with ``threads`` threads)."""
        if self.workers:
            return self.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max(1, ((cores or os.cpu_count() or 1) - 1) // self.threads)

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> EdgeConfig:
        return cls(**settings_from_toml(path, "edge", overrides))
