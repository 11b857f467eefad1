"""The edge agent: stores uploaded blocks, runs block ranges for devices, reports its load.

``EdgeAgent`` is a thin facade over parts that each own one concern, all owned by one loop
(``edge-loop``, an ``AgentLoop``):

- ``EdgeThreads`` (``threads.py``) — the loop, and the threads of blocking work whose results
  come back to it: ``edge-store`` (the block store's one writer), ``edge-loader`` (blocks
  checked, screened, then loaded and profiled in the probe process) and ``edge-zeroconf``
  (advertisement updates);
- ``WorkerProcess`` (``workers.py``) — uploaded blocks run only in worker processes with a
  memory cap and a time limit per run: the probe (new blocks, from the loader) and one per
  query worker; a block that breaks a limit is quarantined (``quarantine.py``);
- ``InboundRouter`` (``routing.py``) — every inbound message, decoded, validated and
  dispatched on the loop;
- ``BlockLoader`` (``loading.py``) — chunks stored, blocks completed, sessions and profiles,
  the inventory;
- ``QueryQueue`` (``queries.py``) — validated queries in a bounded, fair queue
  (``fair.py``), their worker threads (``edge-worker_N``, ``config.workers``), their results;
- ``StatusReporter`` (``status.py``) — the retained status and the zeroconf advertisement;
- ``Replies`` (``replies.py``) — answers to devices, refusals counted;
- ``PeerTransfers`` (``peers.py``) — edge-to-edge transfer (``edge-peer-connect`` /
  ``edge-peer-push``).

paho's network threads only post each inbound message to the loop; decoding, validation and
every change of state (stats, the query queue, executors and their loaded blocks, block
profiles, status) happen there. The public methods may be called from any thread (they hop
into the loop and wait for its answer). ``start`` starts every thread and ``stop`` joins them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
from pathlib import Path

from edge_agent.config import EdgeConfig
from edge_agent.fair import QueueLimits
from edge_agent.loading import BlockLoader
from edge_agent.metrics import DevicesSeen, EdgeMetrics, EdgeSnapshot
from edge_agent.peers import PeerTransfers
from edge_agent.quarantine import Quarantine
from edge_agent.queries import BatchLimits, QueryQueue, WorkerLimits
from edge_agent.replies import Replies
from edge_agent.routing import InboundRouter
from edge_agent.screen import ScreenLimits, screen_onnx
from edge_agent.stats import EdgeStats
from edge_agent.status import StatusReporter
from edge_agent.store import BlockStore, StoreLimits
from edge_agent.threads import EdgeThreads
from edge_agent.trust import ModelTrust
from edge_agent.workers import BlockFaultError, Chain, WorkerProcess
from iotoffload.loop import LoopClosedError
from iotoffload.runtime.onnx import check_providers
from iotoffload.transport.frame import Inventory
from iotoffload.transport.link import Message
from iotoffload.transport.mqtt import MqttLink, MqttSecurity
from iotoffload.transport.topics import ANY, Topics

log = logging.getLogger(__name__)
__all__ = ["STOP_DRAIN_S", "EdgeAgent", "EdgeStats"]
STOP_DRAIN_S = 10.0  # at stop, queued and running queries get this long to finish


class EdgeAgent:
    """One edge. Owned by its caller (``start``/``stop`` from the owner's thread); its state
    is owned by its loop (``edge-loop``) from ``start`` to ``stop``."""

    def __init__(self, config: EdgeConfig, security: MqttSecurity | None = None) -> None:
        """``security``: TLS and credentials for its broker and its peers' brokers (default:
        ``IOTOFFLOAD_MQTT_*``)."""
        self.config = config
        self.security = security if security is not None else MqttSecurity()
        self.topics = Topics(config.prefix)
        trust = ModelTrust.from_config(config)
        self.store = BlockStore(
            config.store,
            max_block_bytes=config.max_block_bytes,
            screen=functools.partial(
                screen_onnx,
                limits=ScreenLimits(
                    max_bytes=config.max_block_bytes,
                    max_tensor_bytes=config.max_tensor_bytes,
                    max_total_bytes=max(config.max_tensor_bytes, ScreenLimits.max_total_bytes),
                    max_loop_iterations=config.max_loop_iterations,
                ),
            ),
            limits=StoreLimits(
                store_max_bytes=config.store_max_bytes,
                device_max_bytes=config.device_max_bytes,
                device_max_models=config.device_max_models,
                max_chunks=config.max_chunks,
                partial_expiry_s=config.partial_expiry_s,
            ),
            in_use=lambda: self.loader.in_use(),
            admit=lambda a: trust.check(a) is None,  # models stored before require_signed
        )
        self.link: MqttLink | None = None
        self.broker_url = config.broker or ""
        self._stopping = False  # set on the loop at stop: no more messages taken
        self._stats = EdgeStats()
        self.threads = EdgeThreads()
        self.devices_seen = DevicesSeen()
        self.metrics = EdgeMetrics(self._metrics_snapshot)
        self.replies = Replies(config.id, self.topics, self._stats, lambda: self.link)
        worker_limits = WorkerLimits(
            memory_bytes=config.worker_memory_mb * 1024 * 1024,
            run_s=config.run_time_limit_s,
            load_s=config.load_time_limit_s,
            session_threads=config.threads,
            providers=tuple(config.providers),
        )
        self.loader = BlockLoader(
            config.id,
            self.store,
            self._stats,
            self.replies,
            self.threads,
            quarantine=Quarantine(config.store / "quarantine.json"),
            probe=WorkerProcess(
                "edge-probe",
                memory_bytes=worker_limits.memory_bytes,
                threads=config.threads,
                providers=worker_limits.providers,
            ),
            load_time_limit_s=config.load_time_limit_s,
            publish_status=lambda: self.status.publish(),
        )
        self.queries = QueryQueue(
            config.worker_count,
            self._stats,
            self.replies,
            self.threads,
            ran=self.loader.mark_loaded,
            limits=QueueLimits(
                per_device=config.queue_per_device,
                total=config.queue_total,
                max_bytes=config.queue_max_bytes,
            ),
            worker_limits=worker_limits,
            max_deadline_ms=config.max_deadline_ms,
            quarantined=self.loader.quarantine.reason,
            any_quarantined=self.loader.quarantine.__len__,
            on_fault=self.loader.fault,
            observe=self.metrics.observe,
            batching=BatchLimits(config.max_batch, config.batch_delay_ms),
            on_providers=self._used_providers,
        )
        self.loader.settle = self.queries.count
        self.loader.warm = self.queries.warm
        self.peers = PeerTransfers(
            config.id,
            self.topics,
            own_link=self._link,
            own_broker=lambda: self.broker_url,
            on_upload=self._on_upload_message,
            block_path=self._stored_block,
            reply_error=self.replies.error,
            post=self.threads.post,
            allowed_brokers=config.peer_brokers,
            allowed_peers=config.peer_edges,
            announced_by=self.store.announced_by,
            protocol=config.protocol,
            chunk_bytes=config.transfer_chunk_bytes,
            security=self.security,
        )
        self.status = StatusReporter(
            config,
            self.topics,
            self.store,
            self._stats,
            self.queries,
            self.peers,
            self.threads,
            link=lambda: self.link,
            broker=lambda: self.broker_url,
            stopping=lambda: self._stopping,
        )
        self.status.quarantined = lambda: len(self.loader.quarantine)
        self.status.devices = self.devices_seen.active
        self.router = InboundRouter(
            self.store,
            self.replies,
            self.loader,
            self.queries,
            self.status,
            self.peers,
            self.threads,
            self.topics,
            max_body=config.max_block_bytes,
            stopping=lambda: self._stopping,
            check_announce=trust.check,
            max_tensor_bytes=config.max_tensor_bytes,
            saw=self.devices_seen.saw,
        )

    def _used_providers(self, worker: str, used: tuple[str, ...]) -> None:
        """(On the loop.) A query worker's sessions run on ``used``: a change is published
        (an operator's view of a GPU edge that fell back to its CPU)."""
        before = self._stats.providers_in_use()
        self._stats.used_providers(worker, used)
        if self._stats.providers_in_use() != before:
            self.status.publish()

    def _metrics_snapshot(self) -> EdgeSnapshot | None:
        """On a scrape's thread: the loop's figures, taken there (None once it is gone)."""
        lp = self.threads.loop
        if lp is None:
            return None

        def take() -> EdgeSnapshot:
            return EdgeSnapshot(self.status.status("online"), self._stats.copy())

        try:
            return lp.call(take, timeout=5)
        except (TimeoutError, LoopClosedError, concurrent.futures.CancelledError):
            return None

    @property
    def metrics_port(self) -> int | None:
        """The Prometheus endpoint's port, while it is served."""
        return self.metrics.port

    def _link(self) -> MqttLink:
        assert self.link is not None, "the edge is not started"
        return self.link

    def _stored_block(self, model_id: str, i: int) -> tuple[str, Path] | None:
        """(sha256, path) of block ``i`` of a model when stored (any thread: the store's
        in-memory index)."""
        a = self.store.model(model_id)
        if a is None or not 0 <= i < len(a.blocks):
            return None
        sha = a.blocks[i].onnx_sha256
        return (sha, self.store.block_path(sha)) if self.store.has_block(sha) else None

    # network threads: hand the message to the loop, nothing else --------------------------
    def _on_control_message(self, m: Message) -> None:
        self.router.on_control_message(m)

    def _on_upload_message(self, m: Message) -> None:
        self.router.on_upload_message(m)

    def _on_query_message(self, m: Message) -> None:
        self.router.on_query_message(m)

    # lifecycle ----------------------------------------------------------------------------
    def start(self, broker_url: str | None = None) -> None:
        self.broker_url = broker_url or self.config.broker or self.broker_url
        if not self.broker_url:
            raise ValueError("no broker URL")
        if self.threads.loop is not None:
            raise RuntimeError("the edge is started already")
        check_providers(self.config.providers)  # before anything starts: a setup error
        cid = self.config.id
        self._stopping = False
        self.queries.open()
        lp = self.threads.open()
        self.peers.open()
        try:
            will = self.threads.call(lambda: self.status.status_json("offline"))
            self.link = MqttLink(
                self.broker_url,
                f"edge-{cid}",
                protocol=self.config.protocol,
                will=(self.topics.edge_status(cid), will, True),
                security=self.security,
            )
            self.link.subscribe(self.topics.edge_control(cid, ANY), self._on_control_message)
            self.link.subscribe(self.topics.edge_upload(cid, ANY), self._on_upload_message)
            self.link.subscribe(self.topics.edge_query(cid, ANY), self._on_query_message)
            # a restarted broker lost the retained status (a hook on the network thread)
            self.link.on_reconnect.append(lambda: self.threads.post(self.status.publish))
            self.link.connect()
            lp.run(self._begin(), timeout=30)
            if self.config.advertise:
                self.status.advertise(self.load_factor())
            if self.config.metrics_port is not None:
                self.metrics.serve(self.config.metrics_address, self.config.metrics_port)
        except BaseException:
            self.stop()
            raise
        log.info("edge %s online at %s, store %s", cid, self.broker_url, self.config.store)

    async def _begin(self) -> None:
        self.status.begin()
        self.threads.spawn(self._prestart_probe())
        self.threads.spawn(self._housekeeping())

    async def _prestart_probe(self) -> None:
        """The probe process started on the loader thread, ahead of the first block."""
        try:
            await self.threads.on_loader(self.loader.probe.prestart)
        except BlockFaultError as e:
            log.warning(
                "edge %s: the probe did not start (%s): again on first use", self.config.id, e
            )

    async def _housekeeping(self) -> None:
        """On the loop until stop: expire partial uploads (and save the models' last use)
        on the store thread, a few times per expiry period."""
        every = max(1.0, min(60.0, self.config.partial_expiry_s / 4))
        while True:
            await asyncio.sleep(every)
            try:
                n = await self.threads.on_store(self.store.expire_partials)
            except OSError as e:
                log.warning("edge %s: expiring partial uploads failed: %s", self.config.id, e)
                continue
            if n:
                log.info("edge %s: %d partial uploads expired", self.config.id, n)
                self.status.publish()

    def stop(self) -> None:
        """Publish offline, finish what runs, join every thread ``start`` started."""
        lp = self.threads.loop
        if lp is None:
            return
        try:
            lp.run(self._quiesce(), timeout=STOP_DRAIN_S + 5)
        except (TimeoutError, LoopClosedError, concurrent.futures.CancelledError):
            log.warning("edge %s: the loop did not quiesce", self.config.id)
        self.metrics.close()
        self.threads.shutdown_zeroconf()
        self.status.close_advertiser()
        self.queries.close()
        self.threads.shutdown_pools()
        self.loader.probe.close()
        links: list[MqttLink] = []
        try:
            links = lp.run(self.peers.drain(), timeout=self.peers.connect_timeout + 5)
        except (TimeoutError, LoopClosedError, concurrent.futures.CancelledError):
            log.warning("edge %s: peer transfers did not drain", self.config.id)
        self.peers.close(links)
        if self.link:
            if self.link.connected:
                offline = self.threads.call(lambda: self.status.status_json("offline"))
                info = self.link.publish(
                    self.topics.edge_status(self.config.id), offline, retain=True
                )
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(2)
            self.link.close()
        self.threads.close()

    async def _quiesce(self) -> None:
        """On the loop: take no more messages, stop the status task, let queued and running
        queries finish (bounded)."""
        self._stopping = True
        await self.status.end()
        await self.queries.drain(STOP_DRAIN_S)
        self.queries.count()

    # reads and hops (from any thread) -----------------------------------------------------
    def load_factor(self) -> float:
        """Coarse load for discovery: queued plus running queries per worker."""
        return self.threads.call(self.queries.load_factor)

    def publish_status(self) -> None:
        self.threads.call(self.status.publish)

    def chain(self, model_id: str) -> Chain | None:
        return self.threads.call(lambda: self.loader.chain(model_id))

    def worker_pids(self) -> list[int]:
        """The ONNX Runtime processes running now: the query workers' and the probe's."""
        pids = self.queries.worker_pids()
        if (p := self.loader.probe.pid) is not None:
            pids.append(p)
        return pids

    def inventory(self, model_id: str) -> Inventory:
        return self.threads.call(lambda: self.loader.inventory(model_id))

    @property
    def stats(self) -> EdgeStats:
        """A copy of the counters, taken on the loop (``in_flight`` as of now)."""

        def copy() -> EdgeStats:
            self.queries.count()
            return self._stats.copy(in_flight=self.queries.in_flight)

        return self.threads.call(copy)
