"""The edge's Prometheus metrics (prometheus-client), served over HTTP when ``metrics_port``
is set.

One owner per figure, as everywhere in the edge: counts and store figures belong to the loop
and are read on each scrape from one snapshot the loop takes (``EdgeSnapshot``: its status
and counters, as the retained status shows them); the two latency histograms are observed by
the worker threads as each query ends (prometheus-client's histograms are thread-safe: a lock
held for an addition). Each edge has a registry of its own, so several edges in one process
(tests, benches) do not mix their figures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge_agent.stats import EdgeStats
from iotoffload.transport.status import EdgeStatus

log = logging.getLogger(__name__)

# queue waits and runs from a fraction of a millisecond (a small block, an idle edge) to
# the deadline cap's order (30 s)
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)  # queries per batch (max_batch <= 64)
DEVICE_WINDOW_S = 60.0  # a device heard from within this long counts as connected
MAX_DEVICES = 10_000  # devices remembered (on an open broker a stranger may invent ids)
SNAPSHOT_TTL_S = 0.5  # scrapes this close together share one snapshot of the loop's figures


class MetricsBindError(ValueError):
    """The metrics endpoint cannot listen where configured (a setup error)."""


class DevicesSeen:
    """Devices heard from lately (a valid query, announce or hello in their own name), for the
    ``devices_connected`` gauge. Written by the network threads and the loop under a lock
    held for a dict update only; bounded, oldest forgotten first."""

    def __init__(self, window_s: float = DEVICE_WINDOW_S, limit: int = MAX_DEVICES) -> None:
        self._window_s = window_s
        self._limit = limit
        self._last: dict[str, float] = {}  # insertion order is recency
        self._lock = threading.Lock()

    def saw(self, device: str, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        with self._lock:
            last = self._last
            last.pop(device, None)
            last[device] = t
            if len(last) > self._limit:
                del last[next(iter(last))]

    def active(self, now: float | None = None) -> int:
        cutoff = (time.monotonic() if now is None else now) - self._window_s
        with self._lock:
            last = self._last
            while last:
                oldest = next(iter(last))
                if last[oldest] >= cutoff:
                    break
                del last[oldest]
            return len(last)


@dataclass(frozen=True)
class EdgeSnapshot:
    """What one scrape reads, taken on the loop."""

    status: EdgeStatus
    stats: EdgeStats


class _SnapshotCollector(Collector):
    """Scrapes within ``SNAPSHOT_TTL_S`` of each other share one snapshot: however often
    the endpoint is asked (a scraper gone wild, a stranger on the network), the loop takes at
    most a few snapshots a second."""

    def __init__(self, snapshot: Callable[[], EdgeSnapshot | None]) -> None:
        self._snapshot = snapshot
        self._lock = threading.Lock()  # the cache below; held while one snapshot is taken
        self._last: tuple[float, EdgeSnapshot | None] = (-1e9, None)

    def _take(self) -> EdgeSnapshot | None:
        with self._lock:
            at, snap = self._last
            now = time.monotonic()
            # none (the edge not running, or its loop stuck): asked again, one at a time
            if now - at >= SNAPSHOT_TTL_S or snap is None:
                snap = self._snapshot()
                self._last = (now, snap)
            return snap

    def collect(self) -> Iterator[Metric]:
        snap = self._take()
        if snap is None:  # the edge is stopping: the histograms only
            return
        st, s = snap.status, snap.stats
        yield _info(st)
        yield _counter("queries", "queries answered with a result", s.queries)
        errors = CounterMetricFamily(
            "iotoffload_edge_errors", "requests refused, by error code", labels=["code"]
        )
        for code, n in sorted(s.error_codes.items()):
            errors.add_metric([code], n)
        yield errors
        yield _counter("upload_chunks", "upload chunks received", s.chunks)
        yield _counter("blocks_uploaded", "blocks stored from device uploads", s.blocks_stored)
        yield _counter(
            "blocks_from_peers", "blocks stored from peer edges' transfers", s.blocks_from_peers
        )
        yield _counter("blocks_pushed", "blocks pushed to peer edges", st.transfer.blocks_pushed)
        yield _gauge("queue", "queries waiting for a worker", st.load.queue)
        yield _gauge("in_flight", "queries running now", st.load.in_flight)
        yield _gauge("blocks", "blocks in the store", st.blocks)
        yield _gauge("store_bytes", "bytes of stored blocks and partial uploads", st.store.bytes)
        yield _gauge("partial_uploads", "blocks being uploaded", st.store.partial_uploads)
        yield _gauge("quarantined_blocks", "blocks refused for good", st.store.quarantined)
        yield _gauge("models", "models in the store", st.models_total)
        yield _gauge(
            "devices_connected",
            f"devices heard from in the last {DEVICE_WINDOW_S:g} s",
            st.devices,
        )


def _info(st: EdgeStatus) -> InfoMetricFamily:
    info = InfoMetricFamily("iotoffload_edge", "the edge's identity and setup")
    info.add_metric(
        [],
        {
            "edge": st.edge,
            "version": st.version,
            "broker": st.broker,
            "protocol": str(st.protocol),
            "providers": ",".join(st.providers),
            "providers_in_use": ",".join(st.providers_in_use),
        },
    )
    return info


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"iotoffload_edge_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"iotoffload_edge_{name}", doc, value=value)


class EdgeMetrics:
    """An edge's metrics: ``observe`` from the worker threads, ``serve`` to expose them."""

    def __init__(self, snapshot: Callable[[], EdgeSnapshot | None]) -> None:
        # no auto_describe: it would take a snapshot at registration, before the edge runs
        self.registry = CollectorRegistry()
        self.queue_seconds = Histogram(
            "iotoffload_edge_queue_seconds",
            "time a query waited for a worker",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.exec_seconds = Histogram(
            "iotoffload_edge_exec_seconds",
            "time a query's blocks took in its worker process (handoff included)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "iotoffload_edge_batch_size",
            "queries run together in one batch, per query answered (1: alone)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshot))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The port served, or None when not serving."""
        return None if self._server is None else int(self._server.server_address[1])

    def observe(self, queue_ms: float, exec_ms: float, batch: int = 1) -> None:
        """Per query, on a worker thread: nothing to do unless someone may scrape."""
        if self._server is None:
            return
        self.queue_seconds.observe(queue_ms / 1e3)
        self.exec_seconds.observe(exec_ms / 1e3)
        self.batch_size.observe(batch)

    def serve(self, address: str, port: int) -> int:
        """Serve ``/metrics`` on ``address:port`` (port 0: a free one); the port bound."""
        try:
            server, thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:
            raise MetricsBindError(f"cannot serve metrics on {address}:{port}: {e}") from e
        self._server, self._thread = server, thread
        log.info("metrics on http://%s:%s/metrics", address, self.port)
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
