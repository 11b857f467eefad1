"""The edge's counters."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class EdgeStats:
    """An edge's counters. Owned by the edge loop: changed only there (workers post their
    results back), so no update is lost; ``EdgeAgent.stats`` hands out copies."""

    queries: int = 0
    errors: int = 0
    chunks: int = 0
    blocks_stored: int = 0
    blocks_from_peers: int = 0
    queue_ms_ewma: float = 0.0
    exec_ms_ewma: float = 0.0
    in_flight: int = 0  # queries running now: filled in by ``copy`` (the workers' gauge)
    error_codes: dict[str, int] = field(default_factory=dict)
    # query worker -> the providers ONNX Runtime gave its sessions at its last load
    providers_by_worker: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def copy(self, **now: int) -> EdgeStats:
        return replace(
            self,
            error_codes=dict(self.error_codes),
            providers_by_worker=dict(self.providers_by_worker),
            **now,
        )

    def providers_in_use(self) -> list[str]:
        """Every provider some worker's sessions run on, in the order first seen (empty
        before any block was loaded)."""
        return list(dict.fromkeys(p for used in self.providers_by_worker.values() for p in used))

    def used_providers(self, worker: str, used: tuple[str, ...]) -> None:
        """(On the loop.) A worker's sessions were made on ``used``."""
        self.providers_by_worker[worker] = used
