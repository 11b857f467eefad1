"""The device's session with one edge: what the edge holds of the model, the estimates of the
link to it, and the chunked, resumable upload of blocks to it.

A device keeps one session per edge it has talked to (the current one, candidates it probes,
an edge it uploads to proactively); they may sit on different brokers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from iotoffload.model.package import ModelPackage
from iotoffload.planning import Estimates, PlanningInputs
from iotoffload.transport.frame import (
    Announce,
    BlockInfo,
    Error,
    Hello,
    Inventory,
    Transfer,
    UploadAck,
    UploadChunk,
    encode,
)
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
MISS_WINDOW_S = 30.0  # deadline misses older than this no longer count toward a move


class EdgeSession:
    def __init__(
        self,
        edge_id: str,
        broker: str,
        link: MqttLink,
        *,
        pkg: ModelPackage,
        device_id: str,
        topics: Topics,
        inputs: PlanningInputs,
        chunk_size: int,
        peer_stall_s: float = 3.0,
        chunks_in_flight: int = 3,
    ) -> None:
        self.edge_id = edge_id
        self.broker = broker
        self.link = link
        self.pkg = pkg
        self.device_id = device_id
        self.topics = topics
        self.inputs = inputs  # its own Estimates: each edge has its own link and load
        self.chunk_size = chunk_size
        self.peer_stall_s = peer_stall_s
        self.online = True
        self.announced = False
        self.known = False  # the edge has my model's chain
        self._lock = threading.Lock()
        self._edge_base: dict[int, float] = {}
        self._stored: set[int] = set()
        self._loaded: set[int] = set()
        self._partial: dict[int, list[int]] = {}
        self._inventory = threading.Event()
        self.inventory_seen = False
        self._block_done: dict[int, threading.Event] = {}
        self._block_failed: dict[int, str] = {}
        self._resync = threading.Event()
        self._awaiting_resync = False
        self._last_hello = 0.0
        self._hello_sent: float | None = None
        # bandwidth from the upload itself: the spacing of chunk acks while the window keeps
        # the link busy (a whole block's ack also waits for the edge to check and load it)
        self._ack_run: list[tuple[float, int]] = []
        # Chunks sent but not acked. Queries share the connection with the upload: without
        # this bound a query waits behind every chunk paho has queued (whole blocks, seconds
        # on a slow link); with it, behind at most a few chunks.
        self.chunks_in_flight = chunks_in_flight
        self._unacked: set[tuple[int, int]] = set()
        self._acked = threading.Condition(self._lock)
        self._queries = 0  # queries in flight to this edge: the upload yields the link to them
        self._pace_until = 0.0
        self.misses: deque[float] = deque(maxlen=64)
        self.chunks_sent: dict[int, int] = {}
        self.resumed_blocks: list[int] = []
        self.bytes_uploaded = 0
        self.upload_errors: list[str] = []
        self.upload_complete = False
        # edge-to-edge transfer: blocks a peer edge is pushing to this edge for us
        self.peer_blocks: set[int] = set()
        self.peer_failed: set[int] = set()
        self.peer_source = ""
        self._peer_progress = 0.0

    # what the edge holds --------------------------------------------------------------------
    @property
    def stored(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._stored)

    def has(self, start: int, end: int) -> bool:
        with self._lock:
            return all(i in self._stored for i in range(start, end))

    @property
    def inventory(self) -> Inventory:
        with self._lock:
            return Inventory(
                model_id=self.pkg.manifest.model_id,
                known=self.known,
                stored=sorted(self._stored),
                loaded=sorted(self._loaded),
                partial=dict(self._partial),
                edge=self.edge_id,
            )

    def recent_misses(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return sum(1 for t in list(self.misses) if now - t < MISS_WINDOW_S)

    # control --------------------------------------------------------------------------------
    def announce(self, timeout: float) -> Inventory | None:
        m = self.pkg.manifest
        announce = Announce(
            device=self.device_id,
            model_id=m.model_id,
            name=m.name,
            blocks=[
                BlockInfo(
                    onnx_sha256=b.onnx_sha256,
                    onnx_bytes=b.onnx_bytes,
                    input=b.input,
                    output=b.output,
                )
                for b in m.blocks
            ],
        )
        self._inventory.clear()
        t0 = time.perf_counter()
        self.link.publish(self.topics.edge_control(self.edge_id), encode(announce))
        if not self._inventory.wait(timeout):
            log.warning("edge %s did not answer the announce", self.edge_id)
            return None
        self.announced = True
        self.inputs.estimates.observe_rtt((time.perf_counter() - t0) * 1e3)
        return self.inventory

    def hello(self) -> None:
        """Ask for the inventory (answered by the edge; the round trip is an RTT sample). A
        previous hello still unanswered counts as a miss: a silent edge is not a good one."""
        if self._hello_sent is not None and time.perf_counter() - self._hello_sent > 1.0:
            self.misses.append(time.monotonic())
        self._last_hello = time.monotonic()
        self._hello_sent = time.perf_counter()
        self._inventory.clear()
        hello = Hello(device=self.device_id, model_id=self.pkg.manifest.model_id)
        self.link.publish(self.topics.edge_control(self.edge_id), encode(hello))

    def probe(self, timeout: float = 2.0) -> float | None:
        t0 = time.perf_counter()
        self.hello()
        if not self._inventory.wait(timeout):
            return None
        return (time.perf_counter() - t0) * 1e3

    def request_transfer(self, source: EdgeSession, blocks: list[int]) -> None:
        """Ask this edge to fetch ``blocks`` from ``source`` over the backhaul."""
        with self._lock:
            self.peer_blocks = set(blocks)
            self.peer_failed = set()
            self.peer_source = source.edge_id
            self._peer_progress = time.monotonic()
        t = Transfer(
            device=self.device_id,
            model_id=self.pkg.manifest.model_id,
            source_edge=source.edge_id,
            source_broker=source.broker,
            blocks=blocks,
        )
        self.link.publish(self.topics.edge_control(self.edge_id), encode(t))

    def after_reconnect(self) -> None:
        self._awaiting_resync = True
        self.hello()  # the inventory answer sets _resync

    # frames from this edge (network thread) ----------------------------------------------
    def on_inventory(self, h: Inventory) -> None:
        with self._lock:
            self._unacked.clear()  # the inventory is the edge's whole state: resend from it
            self._acked.notify_all()
            self.known = h.known
            self._stored, self._loaded = set(h.stored), set(h.loaded)
            self._partial = dict(h.partial)
            for i in h.stored:
                self._block_done.setdefault(i, threading.Event()).set()
        for i, ms in h.block_ms.items():
            self.update_edge_profile(i, ms)
        if self._hello_sent is not None:
            self.inputs.estimates.observe_rtt((time.perf_counter() - self._hello_sent) * 1e3)
            self._hello_sent = None
        self.inventory_seen = True
        self._inventory.set()
        if self._awaiting_resync:
            self._awaiting_resync = False
            self._resync.set()

    def on_ack(self, h: UploadAck) -> None:
        with self._lock:
            mine = (h.block, h.chunk) in self._unacked
            self._unacked.discard((h.block, h.chunk))
            self._acked.notify_all()
            if h.block in self.peer_blocks:
                self._peer_progress = time.monotonic()
            if not h.block_done:
                if mine:
                    self._observe_chunk_ack()
                return
            self._unacked = {u for u in self._unacked if u[0] != h.block}
            self._stored.add(h.block)
            if h.loaded:
                self._loaded.add(h.block)
            self._partial.pop(h.block, None)
            self._block_done.setdefault(h.block, threading.Event()).set()
        self.update_edge_profile(h.block, h.block_ms)

    def _observe_chunk_ack(self, run: int = 4) -> None:
        """Every ``run`` chunk acks in a row, one bandwidth sample: the chunks acked after the
        first over the time since it. A pause (a query, the window drained) breaks the run."""
        now = time.perf_counter()
        acks = self._ack_run
        if acks and now - acks[-1][0] > 1.0:
            acks.clear()
        acks.append((now, self.chunk_size))
        if len(acks) > run:
            span = acks[-1][0] - acks[0][0]
            if span > 0:
                self.inputs.estimates.observe_rate(sum(b for _, b in acks[1:]) / span)
            del acks[:-1]

    def on_error(self, h: Error) -> None:
        rid = h.request_id or ""
        kind, _, rest = rid.partition(":")
        if kind == "upload":
            block = int(rest.split(":")[0])
            with self._lock:
                self._unacked = {u for u in self._unacked if u[0] != block}
                self._acked.notify_all()
                self._block_failed[block] = f"{h.code}: {h.message}"
                self._block_done.setdefault(block, threading.Event()).set()
        elif kind == "transfer":  # this edge cannot fetch from the peer at all
            with self._lock:
                self.peer_failed |= self.peer_blocks
            log.info("transfer to %s: %s", self.edge_id, h.message)
        elif kind == "transfer-block":  # the peer will not push this block: send it myself
            _, _, index = rest.rpartition(":")
            with self._lock:
                self.peer_failed.add(int(index))
            log.info("transfer to %s: %s", self.edge_id, h.message)

    def on_status(self, online: bool, queue_ms: float) -> None:
        self.online = online
        if online:  # the edge's own view of its queue: fresh even while we run local
            self.inputs.estimates.observe_status(queue_ms)

    def update_edge_profile(self, block: int, ms: float | None) -> None:
        if ms is None or ms <= 0:
            return
        self._edge_base[block] = ms
        prof = self.inputs.profile
        edge = tuple(self._edge_base.get(i, prof.edge_ms[i]) for i in range(prof.n))
        self.inputs = dataclasses.replace(
            self.inputs, profile=dataclasses.replace(prof, edge_ms=edge)
        )

    # upload ---------------------------------------------------------------------------------
    def upload(
        self,
        order: list[int],
        progress: Progress | None = None,
        *,
        active: Callable[[], bool] = lambda: True,
        rate_Bps: float | None = None,  # noqa: N803
        block_timeout: float = 30.0,
        retries: int = 3,
        window: int = 2,
    ) -> bool:
        """Send every block of ``order`` the edge lacks; resume partial blocks. Blocks a peer
        edge is pushing are awaited while the push makes progress. Returns False when
        ``active()`` turned false (the device moved away) before the end.

        Up to ``window`` blocks are in flight: the next block travels while the edge checks,
        screens and loads the previous one.
        """
        outstanding: list[tuple[int, bytes]] = []
        for i in order:
            if not active():
                return False
            if self._await_peer(i, active):
                continue
            with self._lock:
                if i in self._stored:
                    continue
                missing = self._partial.get(i)
                self._block_done.setdefault(i, threading.Event())
            data = self.pkg.onnx_path(i).read_bytes()
            if not self._send_block(i, data, missing, progress, rate_Bps, active):
                return False
            outstanding.append((i, data))
            while len(outstanding) >= window:
                self._confirm_block(*outstanding.pop(0), progress, block_timeout, retries)
        for i, data in outstanding:
            self._confirm_block(i, data, progress, block_timeout, retries)
        self.upload_complete = active()
        return self.upload_complete

    def _await_peer(self, i: int, active: Callable[[], bool]) -> bool:
        """True once block i arrived from the peer edge; False when we must send it ourselves
        (not expected from the peer, the peer failed it, or the push stalled)."""
        while True:
            with self._lock:
                if i in self._stored:
                    return True
                if i not in self.peer_blocks or i in self.peer_failed:
                    return False
                stalled = time.monotonic() - self._peer_progress > self.peer_stall_s
            if stalled:
                log.info("transfer to %s stalled: uploading block %d myself", self.edge_id, i)
                with self._lock:
                    self.peer_failed |= self.peer_blocks - self._stored
                return False
            if not active():
                return False
            time.sleep(0.02)

    def _confirm_block(
        self, i: int, data: bytes, progress: Progress | None, block_timeout: float, retries: int
    ) -> None:
        ev = self._block_done[i]
        for attempt in range(retries):
            if self._wait_block(i, data, ev, block_timeout, progress):
                with self._lock:
                    failure = self._block_failed.pop(i, None)
                if failure:  # the edge refused the block: resending cannot help
                    self.upload_errors.append(f"block {i}: {failure}")
                    ev.clear()
                return
            log.warning("block %d not confirmed (attempt %d); asking the edge", i, attempt + 1)
            self.link.wait_connected(block_timeout)
            self.hello()
            self._inventory.wait(5)
            with self._lock:
                missing = self._partial.get(i)
            self._send_block(i, data, missing, progress)
        self.upload_errors.append(f"block {i}: not confirmed after {retries} attempts")

    def _wait_block(
        self, i: int, data: bytes, ev: threading.Event, timeout: float, progress: Progress | None
    ) -> bool:
        """Wait for the block's final ack; after a reconnect resend what the edge lacks."""
        end = time.monotonic() + timeout
        while not ev.is_set() and time.monotonic() < end:
            if self._awaiting_resync and time.monotonic() - self._last_hello > 1.0:
                self.hello()  # the edge may have reconnected after our first hello
            if self._resync.wait(0.1):
                self._resync.clear()
                with self._lock:
                    stored, missing = i in self._stored, self._partial.get(i)
                if not stored:
                    self.resumed_blocks.append(i)
                    log.info(
                        "resuming block %d: %s chunks missing",
                        i,
                        "all" if missing is None else len(missing),
                    )
                    self._send_block(i, data, missing, progress)
        return ev.is_set()

    def query_started(self) -> bool:
        """The upload pauses for the query; True when no chunk is ahead of it on the link."""
        with self._lock:
            self._queries += 1
            self._ack_run.clear()  # the upload pauses: ack spacing no longer measures the link
            return not self._unacked

    def query_done(self) -> None:
        with self._lock:
            self._queries -= 1
            self._acked.notify_all()

    def _wait_window(
        self, active: Callable[[], bool], window: bool = True, timeout: float = 10.0
    ) -> bool:
        """Wait until fewer than ``chunks_in_flight`` chunks are unacked and no query is in
        flight (queries first: a chunk sent now would delay the query's tensor). An ack lost
        for good (broker restart) must not stall the upload: after ``timeout`` go on anyway."""
        end = time.monotonic() + timeout
        with self._acked:
            while self._queries > 0 or (window and len(self._unacked) >= self.chunks_in_flight):
                if not active():
                    return False
                if time.monotonic() > end:  # acks lost, or a query stuck: go on anyway
                    log.info(
                        "upload to %s: %d chunk acks missing, %d queries in flight; going on",
                        self.edge_id,
                        len(self._unacked),
                        self._queries,
                    )
                    self._unacked.clear()
                    break
                self._acked.wait(0.05)
        return True

    def _send_block(
        self,
        i: int,
        data: bytes,
        missing: list[int] | None,
        progress: Progress | None,
        rate_Bps: float | None = None,  # noqa: N803
        active: Callable[[], bool] = lambda: True,
    ) -> bool:
        b = self.pkg.blocks[i]
        chunks = -(-len(data) // self.chunk_size)
        todo = range(chunks) if missing is None else missing
        for c in todo:
            if rate_Bps:  # pace chunks: a capped upload leaves the link to the queries
                wait = self._pace_until - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not active():
                    return False
            last = (
                c == chunks - 1
            )  # acked only once the block is loaded: the block window counts it
            if not self._wait_window(active, window=not last):
                return False
            body = data[c * self.chunk_size : (c + 1) * self.chunk_size]
            h = UploadChunk(
                device=self.device_id,
                model_id=self.pkg.manifest.model_id,
                block=i,
                block_sha256=b.onnx_sha256,
                block_bytes=len(data),
                chunk=c,
                chunks=chunks,
                chunk_size=self.chunk_size,
            )
            if not last:
                with self._lock:
                    self._unacked.add((i, c))
            self.link.publish(self.topics.edge_upload(self.edge_id), encode(h, body))
            if rate_Bps:
                self._pace_until = max(self._pace_until, time.monotonic()) + len(body) / rate_Bps
            self.bytes_uploaded += len(body)
            self.chunks_sent[i] = self.chunks_sent.get(i, 0) + 1
            if progress:
                progress(i, len(body))
        return True


def fresh_estimates(like: Estimates) -> Estimates:
    """A new edge's starting estimates: the link's bandwidth as measured so far, no load."""
    return Estimates(bandwidth_Bps=like.bandwidth_Bps, rtt_ms=like.rtt_ms, alpha=like.alpha)
