"""The chain's profile for planning: per-block device time (measured by the device, see
``iotoffload.runtime.profiling``), edge time (reported or estimated), boundary and upload bytes
(from the manifest). Pure: no model runs, no disk."""

from __future__ import annotations

from collections.abc import Sequence

from iotoffload.model.package import ModelPackage
from iotoffload.planning.model import ChainProfile


def chain_profile(
    pkg: ModelPackage,
    device_ms: Sequence[float],
    edge_ms: Sequence[float] | None = None,
    *,
    edge_speed: float = 1.0,
) -> ChainProfile:
    """The chain's profile; edge times default to device times ÷ the edge's speed ratio."""
    blocks = pkg.blocks
    return ChainProfile(
        device_ms=tuple(device_ms),
        edge_ms=tuple(edge_ms) if edge_ms is not None else tuple(d / edge_speed for d in device_ms),
        boundary_bytes=(blocks[0].input.nbytes, *(b.output_bytes for b in blocks)),
        upload_bytes=tuple(b.upload_bytes for b in blocks),  # what an upload sends
    )
