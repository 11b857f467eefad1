"""The edges a device could use, from zeroconf and from retained status topics."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from iotoffload.transport.mqtt import BrokerURL


@dataclass(frozen=True)
class EdgeCandidate:
    id: str
    broker: str
    online: bool = True
    queue_ms: float = 0.0
    load: float = 0.0
    sources: frozenset[str] = field(default_factory=frozenset)  # "zeroconf", "status"
    last_seen: float = 0.0


def parse_status(payload: bytes) -> dict[str, Any] | None:
    """A retained status message, or None when it is not one of ours."""
    try:
        s = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(s, dict) or not isinstance(s.get("edge"), str):
        return None
    if s.get("state") not in ("online", "offline"):
        return None
    return s


class Candidates:
    """Thread-safe table of edges; zeroconf and status updates merge into one entry per id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._edges: dict[str, EdgeCandidate] = {}

    def seen(
        self,
        edge: str,
        broker: str,
        source: str,
        *,
        online: bool = True,
        queue_ms: float | None = None,
        load: float | None = None,
    ) -> EdgeCandidate:
        broker = str(BrokerURL.parse(broker))
        with self._lock:
            old = self._edges.get(edge) or EdgeCandidate(edge, broker)
            new = replace(
                old,
                broker=broker,
                online=online,
                sources=old.sources | {source},
                queue_ms=old.queue_ms if queue_ms is None else queue_ms,
                load=old.load if load is None else load,
                last_seen=time.monotonic(),
            )
            self._edges[edge] = new
            return new

    def from_status(self, payload: bytes) -> EdgeCandidate | None:
        s = parse_status(payload)
        if s is None or not isinstance(s.get("broker"), str):
            return None
        load = s["load"] if isinstance(s.get("load"), dict) else {}
        try:
            return self.seen(
                s["edge"],
                s["broker"],
                "status",
                online=s["state"] == "online",
                queue_ms=float(load.get("queue_ms", 0.0)),
            )
        except (ValueError, TypeError):
            return None

    def gone(self, edge: str) -> None:
        """zeroconf removed it: offline until it is seen again."""
        with self._lock:
            old = self._edges.get(edge)
            if old is not None:
                self._edges[edge] = replace(old, online=False, last_seen=time.monotonic())

    def get(self, edge: str) -> EdgeCandidate | None:
        with self._lock:
            return self._edges.get(edge)

    def all(self) -> list[EdgeCandidate]:
        with self._lock:
            return sorted(self._edges.values(), key=lambda c: c.id)
