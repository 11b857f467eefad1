"""An edge's retained status (``{p}/edges/{edge}/status``): written by the edge, read by
devices, ``iotoffload`` tools and other apps. One model for both sides.

Readers ignore fields they do not know (an edge of a newer minor version may add some) but
refuse a status whose known fields are malformed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iotoffload.ids import ID_PATTERN, PROVIDER_PATTERN

MAX_STATUS_BYTES = 64 * 1024


class _S(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class EdgeLoad(_S):
    queue: int = Field(default=0, ge=0)  # queries waiting for a worker
    in_flight: int = Field(default=0, ge=0)  # queries running now
    queue_ms: float = Field(default=0.0, ge=0)  # EWMA of the time a query waits
    exec_ms: float = Field(default=0.0, ge=0)  # EWMA of a query's execution time


class TransferCounts(_S):
    blocks_pushed: int = Field(default=0, ge=0)
    blocks_from_peers: int = Field(default=0, ge=0)


class StoreCounts(_S):
    """The edge's block store (``models`` above lists at most the edge's
    ``status_max_models``; ``models_total`` says how many there are)."""

    bytes: int = Field(default=0, ge=0)  # stored blocks and partial uploads
    partial_uploads: int = Field(default=0, ge=0)
    quarantined: int = Field(default=0, ge=0)  # blocks that broke a limit: refused for good


# what an edge's config accepts (EdgeConfig.providers); a status naming anything else is not
# an edge's: refused whole, so no reader ever shows a stranger's text as a provider
ProviderName = Annotated[str, Field(pattern=PROVIDER_PATTERN)]


class EdgeStatus(_S):
    state: Literal["online", "offline"]
    edge: str = Field(pattern=ID_PATTERN)
    version: str = ""
    broker: str = Field(default="", max_length=256)  # where the edge listens (for a device to move)
    protocol: int = 5
    load: EdgeLoad = EdgeLoad()
    models: list[str] = []  # at most the edge's status_max_models (see models_total)
    models_total: int = Field(default=0, ge=0)
    blocks: int = Field(default=0, ge=0)
    store: StoreCounts = StoreCounts()
    transfer: TransferCounts = TransferCounts()
    providers: list[ProviderName] = Field(default=["CPUExecutionProvider"], max_length=16)
    # what ONNX Runtime registered for the workers' sessions (empty before a block is loaded,
    # and from edges older than the field): a configured provider missing here is not running
    providers_in_use: list[ProviderName] = Field(default=[], max_length=16)
    devices: int = Field(default=0, ge=0)  # devices heard from in the last minute
    time: float = 0.0

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def parse(cls, payload: bytes | str) -> EdgeStatus | None:
        """The status in a retained message, or None when it is not a valid one."""
        if len(payload) > MAX_STATUS_BYTES:
            return None
        try:
            return cls.model_validate_json(payload)
        except (ValidationError, ValueError, RecursionError):
            return None
