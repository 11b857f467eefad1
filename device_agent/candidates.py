"""The edges a device could use, from zeroconf and from retained status topics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from iotoffload.transport.mqtt import BrokerURL
from iotoffload.transport.status import EdgeStatus


@dataclass(frozen=True)
class EdgeCandidate:
    id: str
    broker: str
    online: bool = True
    queue_ms: float = 0.0
    load: float = 0.0
    sources: frozenset[str] = field(default_factory=frozenset)  # "zeroconf", "status"
    last_seen: float = 0.0


class Candidates:
    """The table of edges; zeroconf and status updates merge into one entry per id.

    Owned by the device agent's loop (zeroconf and MQTT callbacks post to it); other threads
    may read entries, which are frozen."""

    def __init__(self, allowed: list[str] | None = None, *, require_tls: bool = False) -> None:
        """``allowed``: the edge ids this device may use (offload to, upload to, move to);
        None or ``["*"]`` for any edge the broker vouches for. ``require_tls``: only edges on
        ``mqtts://`` brokers (a device with a CA or credentials never sends them, nor its
        tensors, to a plain broker a spoofed record names)."""
        self._edges: dict[str, EdgeCandidate] = {}
        self._require_tls = require_tls
        self._allowed = None if allowed is None or "*" in allowed else frozenset(allowed)

    def allows(self, edge: str) -> bool:
        return self._allowed is None or edge in self._allowed

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
        """Merge what ``source`` says of ``edge``. ValueError for an edge this device's
        policy does not allow or a broker URL it cannot use."""
        if not self.allows(edge):
            raise ValueError(f"edge {edge} is not in this device's allowed edges")
        url = BrokerURL.parse(broker)
        if self._require_tls and not url.tls:
            raise ValueError(
                f"edge {edge} is on the plain broker {url}: this device connects only over "
                "TLS (mqtts://) with its credentials"
            )
        broker = str(url)
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
        """Merge a retained status message; None (and nothing changed) when it is not one."""
        st = EdgeStatus.parse(payload)
        return None if st is None else self.from_edge_status(st)

    def from_edge_status(self, st: EdgeStatus) -> EdgeCandidate | None:
        if not st.broker:
            return None
        try:
            return self.seen(
                st.edge, st.broker, "status", online=st.state == "online", queue_ms=st.load.queue_ms
            )
        except ValueError:  # not a broker URL we can use
            return None

    def gone(self, edge: str) -> bool:
        """zeroconf removed it (an mDNS goodbye, which anyone on the link can send): offline
        until it is seen again, unless its retained status on the broker (which only that edge
        may write, on a secured broker) still says online. True when it went offline."""
        old = self._edges.get(edge)
        if old is None:
            return False
        still = old.online and "status" in old.sources
        self._edges[edge] = replace(
            old,
            online=still,
            sources=old.sources - {"zeroconf"},
            last_seen=time.monotonic(),
        )
        return not still

    def get(self, edge: str) -> EdgeCandidate | None:
        return self._edges.get(edge)

    def all(self) -> list[EdgeCandidate]:
        return sorted(list(self._edges.values()), key=lambda c: c.id)
