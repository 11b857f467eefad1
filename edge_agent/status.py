"""What the edge tells others about itself: its retained ``EdgeStatus`` (published at start,
after a model is stored and after a block is loaded, every ``status_interval`` and after a
reconnect; its offline form is the Last Will and the goodbye at stop) and its zeroconf
advertisement (its load in the TXT record).

Owned by the edge's loop: the status is built and published there, and the status task runs
there (advertisement updates go to ``edge-zeroconf``). The advertiser is registered and closed
by the edge's owner, in ``start`` and ``stop``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal

from edge_agent.config import EdgeConfig
from edge_agent.peers import PeerTransfers
from edge_agent.queries import QueryQueue
from edge_agent.stats import EdgeStats
from edge_agent.store import BlockStore
from edge_agent.threads import EdgeThreads
from iotoffload import __version__
from iotoffload.discovery import EdgeAdvertiser
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.status import EdgeLoad, EdgeStatus, StoreCounts, TransferCounts
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)
MIN_PUBLISH_S = 0.25  # between two retained statuses, whatever happens meanwhile


class StatusReporter:
    """Owned by the edge's loop (``advertise``/``close_advertiser`` on the owner's thread)."""

    def __init__(
        self,
        config: EdgeConfig,
        topics: Topics,
        store: BlockStore,
        stats: EdgeStats,
        queries: QueryQueue,
        peers: PeerTransfers,
        threads: EdgeThreads,
        *,
        link: Callable[[], MqttLink | None],
        broker: Callable[[], str],
        stopping: Callable[[], bool],
    ) -> None:
        self.config = config
        self.topics = topics
        self.store = store
        self._stats = stats
        self._queries = queries
        self._peers = peers
        self._threads = threads
        self._link = link
        self._broker = broker
        self._stopping = stopping
        self.quarantined: Callable[[], int] = lambda: 0  # set by the edge: the quarantine's size
        self.devices: Callable[[], int] = lambda: 0  # set by the edge: devices heard lately
        self._task: asyncio.Task[None] | None = None
        self._last_publish = 0.0
        self._deferred: asyncio.TimerHandle | None = None
        self._advertiser: EdgeAdvertiser | None = None

    def status_json(self, state: Literal["online", "offline"]) -> bytes:
        return self.status(state).to_json()

    def status(self, state: Literal["online", "offline"]) -> EdgeStatus:
        """The edge's status now (on the loop)."""
        self._queries.count()
        s = self._stats
        models = self.store.model_ids()
        usage = self.store.usage()
        return EdgeStatus(
            state=state,
            edge=self.config.id,
            version=__version__,
            broker=self._broker(),
            protocol=self.config.protocol,
            load=EdgeLoad(
                queue=self._queries.queued,
                in_flight=self._queries.in_flight,
                queue_ms=round(s.queue_ms_ewma, 3),
                exec_ms=round(s.exec_ms_ewma, 3),
            ),
            models=models[: self.config.status_max_models],
            models_total=len(models),
            blocks=usage.blocks,
            store=StoreCounts(
                bytes=usage.bytes + usage.partial_bytes,
                partial_uploads=usage.partials,
                quarantined=self.quarantined(),
            ),
            providers=list(self.config.providers),
            providers_in_use=s.providers_in_use(),
            devices=self.devices(),
            transfer=TransferCounts(
                blocks_pushed=self._peers.blocks_pushed, blocks_from_peers=s.blocks_from_peers
            ),
            time=time.time(),
        )

    def publish(self) -> None:
        """Publish the status now, or, within ``MIN_PUBLISH_S`` of the last one, once at the
        end of that interval: a burst of announces costs subscribers one status, not one
        each (on the loop)."""
        if self._deferred is not None:
            return
        wait = self._last_publish + MIN_PUBLISH_S - time.monotonic()
        if wait > 0:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the loop (before start): nothing to coalesce with
                loop = None
            if loop is not None:
                self._deferred = loop.call_later(wait, self._publish_deferred)
                return
        self._publish_now()

    def _publish_deferred(self) -> None:
        self._deferred = None
        self._publish_now()

    def _publish_now(self) -> None:
        link = self._link()
        if link and link.connected and not self._stopping():
            self._last_publish = time.monotonic()
            link.publish(
                self.topics.edge_status(self.config.id), self.status_json("online"), retain=True
            )

    # the status task ----------------------------------------------------------------------
    def begin(self) -> None:
        """Publish now, then every ``status_interval`` (on the loop)."""
        self.publish()
        self._task = self._threads.spawn(self._run())

    async def end(self) -> None:
        """Stop the status task and any deferred publish (on the loop)."""
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        advertised = 0.0
        self._queries.count()
        served = self._stats.queries
        while True:
            await asyncio.sleep(self.config.status_interval)
            self._queries.count()
            s = self._stats
            if s.queries == served and not self._queries.queued:
                # idle since the last status: the queueing estimate fades out
                s.queue_ms_ewma *= 0.5
                s.exec_ms_ewma *= 0.5
            served = s.queries
            self.publish()
            load = self._queries.load_factor()
            adv = self._advertiser
            if adv is not None and abs(load - advertised) >= 0.5:  # TXT updates are multicast
                advertised = load
                try:
                    await self._threads.on_zeroconf(adv.update, load)
                except Exception:  # the status task must outlive zeroconf's trouble
                    log.exception("edge %s: zeroconf update failed", self.config.id)

    # the advertisement (the owner's thread) -----------------------------------------------
    def advertise(self, load: float) -> None:
        """Register the edge on zeroconf (its broker, its ``load``)."""
        advertiser = EdgeAdvertiser(self.config.id, self._broker(), self.config.interface)
        advertiser.register(load)
        self._advertiser = advertiser

    def close_advertiser(self) -> None:
        if self._advertiser:
            self._advertiser.close()
            self._advertiser = None
