"""The device's session with one edge: what the edge holds of the model, the estimates of the
link to it, and the chunked, resumable upload of blocks to it.

A device keeps one session per edge it has talked to (the current one, candidates it probes,
an edge it uploads to proactively); they may sit on different brokers.

Owned by the device agent's loop (``iotoffload.loop.AgentLoop``): every method runs there, the
frame handlers (``on_*``) included. Other threads only read the immutable snapshots it
publishes (``stored``, ``inputs``, ``peer_failed``, the counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import mmap
import time
from collections import deque
from collections.abc import Callable

from iotoffload.model.block_codec import Encoding
from iotoffload.model.package import ModelPackage
from iotoffload.model.signing import announce_signature
from iotoffload.planning import Estimates, PlanningInputs
from iotoffload.transport.frame import (
    Announce,
    BlockInfo,
    Error,
    ErrorCode,
    Hello,
    Inventory,
    Transfer,
    UploadAck,
    UploadChunk,
    encode,
)
from iotoffload.transport.link import Link
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
MISS_WINDOW_S = 30.0  # deadline misses older than this no longer count toward a move
# Chunks are sized to the link: one holds it at most this long (at least half), which is what
# a query's tensor not announced ahead waits behind (the window keeps about one chunk queued
# ahead of the link; an announced one finds the link clear). Each chunk costs a slowed device
# about 1 ms of CPU whatever its size (its frame, two MQTT packets, its ack, and the wake-ups
# of two threads, each with cold caches): at 40 ms the upload took 4.75 ms of CPU per MB at 80
# Mbit/s and 13.4 at 20, at 80 ms 3.36 and 8.7.
CHUNK_LINK_S = 0.08
# With no query offloaded to the edge lately nothing waits behind a chunk: twice as long, half
# the chunks. At 80 Mbit/s (1 MiB chunks, 960 KiB by default) the upload then took 2.24 ms of
# CPU per MB against 3.2 (2026-12-03); with queries flowing the same chunks doubled what a
# tensor waited behind the upload (p50 123 -> 226 ms), so those get CHUNK_LINK_S.
IDLE_CHUNK_LINK_S = 0.16
QUERY_QUIET_S = 5.0  # a query offloaded within this long: chunks for a link queries share
MIN_CHUNK = 16 * 1024  # below this, per-chunk work (frames, acks) costs more than it saves
# Time from a chunk's last byte reaching the edge to its ack reaching us, beyond the round
# trip (the edge writes the chunk first): part of the bytes the window keeps in flight.
ACK_SLACK_S = 0.005
EDGE_MAX_CHUNKS = 4096  # the most chunks an edge takes per block (its max_chunks default)
LOST_CHUNK_S = 3.0  # a block's last chunk acked but no block_done this long: ask what is missing
MAX_WINDOW_RTT_MS = 200.0  # the round trip a window is sized for, at most


# errors that answer an announce: the edge will not take the model as it is
_REFUSES_MODEL = frozenset({ErrorCode.UNSIGNED, ErrorCode.INVALID_MODEL, ErrorCode.QUOTA})


class _Signal:
    """Wakes every coroutine waiting for 'something changed' (acks, inventory, queries)."""

    def __init__(self) -> None:
        self._ev = asyncio.Event()

    def notify(self) -> None:
        self._ev.set()
        self._ev = asyncio.Event()

    async def wait_for(self, pred: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
        """True once ``pred()`` holds; False after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while not pred():
            left = end - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ev.wait(), min(left, poll))
        return True


class EdgeSession:
    """One edge, as this device sees it. Owned by the device agent's loop."""

    def __init__(
        self,
        edge_id: str,
        broker: str,
        link: Link,
        *,
        pkg: ModelPackage,
        device_id: str,
        topics: Topics,
        inputs: PlanningInputs,
        chunk_size: int,
        peer_stall_s: float = 3.0,
    ) -> None:
        self.edge_id = edge_id
        self.broker = broker
        self.link = link
        self.pkg = pkg
        self.device_id = device_id
        self.topics = topics
        self.inputs = inputs  # its own Estimates (each edge has its own link and load); frozen
        self.chunk_size = chunk_size  # the largest chunk (chunks are sized to the link below it)
        self.peer_stall_s = peer_stall_s
        self.online = True
        self.announced = False
        self.known = False  # the edge has my model's chain
        self.refused: str | None = None  # why the edge refused my announce (last one)
        # the edge refused a pixel query (it predates them): block 0's input goes as float32.
        # Set on the loop, read as a snapshot by the query threads.
        self.pixels_refused = False
        self._edge_base: dict[int, float] = {}
        self.stored: frozenset[int] = frozenset()
        self._loaded: frozenset[int] = frozenset()
        self._partial: dict[int, list[int]] = {}
        self._changed = _Signal()
        self._inventory_count = 0  # inventories received: waiters compare against it
        self.inventory_seen = False
        self._block_failed: dict[int, str] = {}
        # blocks sent as their plain .onnx although the package has an encoded upload file:
        # the edge could not decode it (bad_encoding), so the block goes again unencoded
        self._raw: set[int] = set()
        self._resend_raw: set[int] = set()
        # inventories that answered a post-reconnect hello; a block sent (or being sent) before
        # the latest one may have lost chunks with the old connection: resend what it lacks
        self._resyncs = 0
        self._sent_epoch: dict[int, int] = {}
        self._awaiting_resync = False
        self._last_hello = 0.0
        self._rate_Bps: float | None = None  # the upload's pace (None: the link's)
        self._hello_sent: float | None = None
        # the inventory answering a hello sent with nothing unacked is an RTT sample (one sent
        # behind upload chunks measures the queue); one answering a resync resets the window
        self._hello_clean = False
        self._hello_resync = False
        self._last_chunk_acked: dict[int, float] = {}  # block -> when its last chunk was acked
        # bandwidth from the upload itself: the spacing of chunk acks while the window keeps
        # the link busy (a whole block's ack also waits for the edge to check and load it)
        self._ack_run: list[tuple[float, int]] = []
        # Chunks sent but not acked, and their bytes. Queries share the connection with the
        # upload: the window keeps the link busy (the bytes one ack's round trip carries)
        # plus about one chunk queued, so a query's tensor waits behind about one chunk.
        self._unacked: dict[tuple[int, int], int] = {}
        self.unacked_bytes = 0  # read by query threads (an int: a snapshot)
        self._block_chunk: dict[int, int] = {}  # the chunk size each block is sent in
        self._waiters: set[asyncio.Future[None]] = set()  # upload tasks waiting for room
        self._holds: dict[object, tuple[float, float]] = {}  # expected queries (expect_query)
        self._queries = 0  # queries in flight to this edge
        self._last_query = -math.inf  # time.monotonic() of the last query offloaded here
        self._pace_until = 0.0
        self.misses: deque[float] = deque(maxlen=64)
        self.chunks_sent: dict[int, int] = {}
        self.chunk_counts: dict[int, int] = {}  # block -> the chunks it was cut into (last sent)
        self.resumed_blocks: list[int] = []
        self.bytes_uploaded = 0
        self.upload_errors: list[str] = []
        self.upload_complete = False
        # edge-to-edge transfer: blocks a peer edge is pushing to this edge for us
        self.peer_blocks: frozenset[int] = frozenset()
        self.peer_failed: frozenset[int] = frozenset()
        self.peer_source = ""
        self._peer_progress = 0.0

    # what the edge holds --------------------------------------------------------------------
    def _chunks(self, i: int) -> int:
        return -(-self.wire_bytes(i) // self.chunk_of(i))

    def encoding_of(self, i: int) -> Encoding:
        """How block i's upload is encoded: the package's upload file unless the edge could
        not decode it."""
        return "identity" if i in self._raw else self.pkg.blocks[i].encoding

    def wire_bytes(self, i: int) -> int:
        """The bytes block i's upload sends."""
        b = self.pkg.blocks[i]
        return b.onnx_bytes if i in self._raw else b.upload_bytes

    def chunk_of(self, i: int) -> int:
        """The chunk size block i is (or will be) sent in: fixed once its upload started, so
        its chunk indices keep their meaning across resends and resumes."""
        return self._block_chunk.get(i) or self.link_chunk()

    def link_chunk(self) -> int:
        """A chunk that holds the link at most CHUNK_LINK_S (at least half that) at the
        measured bandwidth, IDLE_CHUNK_LINK_S while no query was offloaded here for
        QUERY_QUIET_S (and none announced): a power of two within [MIN_CHUNK, chunk_size],
        or chunk_size itself where that caps it (devices alike on similar links pick the same
        size, so their uploads of a shared block fill one partial)."""
        quiet = time.monotonic() - self._last_query > QUERY_QUIET_S
        hold_s = IDLE_CHUNK_LINK_S if quiet and not self._holds else CHUNK_LINK_S
        want = max(1.0, self.inputs.estimates.bandwidth_Bps * hold_s)
        size = 1 << math.floor(math.log2(want))
        return max(min(self.chunk_size, MIN_CHUNK), min(self.chunk_size, size))

    def window_bytes(self, chunk: int) -> int:
        """Bytes the upload keeps unacked: what the link carries during one ack's round trip
        plus one chunk, and at least two chunks (acks come per chunk: with one in flight the
        link would idle while each ack comes back)."""
        e = self.inputs.estimates
        rtt_s = min(e.rtt_ms, MAX_WINDOW_RTT_MS) / 1e3
        in_flight = e.bandwidth_Bps * (rtt_s + ACK_SLACK_S)
        return max(2 * chunk, chunk + int(in_flight))

    def behind_upload_ms(self) -> float | None:
        """(Any thread.) About how long a tensor published now waits behind upload chunks:
        the unacked bytes beyond what one round trip carries, at the measured bandwidth.
        None when no chunk is unacked."""
        unacked = self.unacked_bytes
        if unacked <= 0:
            return None
        e = self.inputs.estimates
        return max(0.0, unacked / e.bandwidth_Bps * 1e3 - e.rtt_ms)

    def has(self, start: int, end: int) -> bool:
        stored = self.stored
        return all(i in stored for i in range(start, end))

    @property
    def inventory(self) -> Inventory:
        return Inventory(
            model_id=self.pkg.manifest.model_id,
            known=self.known,
            stored=sorted(self.stored),
            loaded=sorted(self._loaded),
            partial=dict(self._partial),
            edge=self.edge_id,
        )

    def recent_misses(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return sum(1 for t in list(self.misses) if now - t < MISS_WINDOW_S)

    def observe(self, update: Callable[[Estimates], Estimates]) -> None:
        """Replace the estimates by ``update(estimates)`` (a new frozen snapshot)."""
        self.inputs = dataclasses.replace(self.inputs, estimates=update(self.inputs.estimates))

    # control --------------------------------------------------------------------------------
    async def _next_inventory(self, timeout: float) -> bool:
        """Wait for the next inventory (none can arrive between a hello and this call: one loop)."""
        seen = self._inventory_count
        return await self._changed.wait_for(lambda: self._inventory_count > seen, timeout)

    async def announce(self, timeout: float) -> Inventory | None:
        m = self.pkg.manifest
        signature, signer = announce_signature(self.pkg)  # (None, None): unsigned
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
            signature=signature,
            signer=signer,
        )
        t0 = time.perf_counter()
        seen = self._inventory_count
        self.refused = None
        self.link.publish(self.topics.edge_control(self.edge_id, self.device_id), encode(announce))
        answered = await self._changed.wait_for(
            lambda: self._inventory_count > seen or self.refused is not None, timeout
        )
        if self.refused is not None:  # the edge will not take this model: no use waiting
            log.warning("edge %s refused the model: %s", self.edge_id, self.refused)
            return None
        if not answered:
            log.warning("edge %s did not answer the announce", self.edge_id)
            return None
        self.announced = True
        ms = (time.perf_counter() - t0) * 1e3
        self.observe(lambda e: e.observe_rtt(ms))
        return self.inventory

    def hello(self, resync: bool = False) -> None:
        """Ask for the inventory (answered by the edge; the round trip is an RTT sample when no
        upload chunk was ahead of it). ``resync``: the answer resets the upload window (the
        edge's state is the truth: what it lacks is resent). A previous hello still
        unanswered counts as a miss: a silent edge is not a good one."""
        late = self._hello_sent is not None and time.perf_counter() - self._hello_sent > 1.0
        if late and self._hello_clean:  # behind upload chunks a hello is slow for good reason
            self.misses.append(time.monotonic())
        self._last_hello = time.monotonic()
        self._hello_sent = time.perf_counter()
        self._hello_clean = not self._unacked
        self._hello_resync = self._hello_resync or resync
        hello = Hello(device=self.device_id, model_id=self.pkg.manifest.model_id)
        self.link.publish(self.topics.edge_control(self.edge_id, self.device_id), encode(hello))

    async def probe(self, timeout: float = 2.0) -> float | None:
        t0 = time.perf_counter()
        seen = self._inventory_count
        self.hello()
        if not await self._changed.wait_for(lambda: self._inventory_count > seen, timeout):
            return None
        return (time.perf_counter() - t0) * 1e3

    def request_transfer(self, source: EdgeSession, blocks: list[int]) -> None:
        """Ask this edge to fetch ``blocks`` from ``source`` over the backhaul."""
        self.peer_blocks = frozenset(blocks)
        self.peer_failed = frozenset()
        self.peer_source = source.edge_id
        self._peer_progress = time.monotonic()
        t = Transfer(
            device=self.device_id,
            model_id=self.pkg.manifest.model_id,
            source_edge=source.edge_id,
            source_broker=source.broker,
            blocks=blocks,
        )
        self.link.publish(self.topics.edge_control(self.edge_id, self.device_id), encode(t))

    def after_reconnect(self) -> None:
        self._awaiting_resync = True
        self.hello()  # the inventory answer counts as a resync

    # frames from this edge -------------------------------------------------------------------
    def on_inventory(self, h: Inventory) -> None:
        if self._hello_resync or self._awaiting_resync:  # the edge's whole state: resend from it
            self._hello_resync = False
            self._clear_unacked()
        self.known = h.known
        self.stored, self._loaded = frozenset(h.stored), frozenset(h.loaded)
        partial: dict[int, list[int]] = {}
        for i, missing in h.partial.items():
            if not 0 <= i < self.pkg.num_blocks or i in self.stored:
                continue
            # the chunking the missing indices count in: the edge's word, else the one this
            # session started the block in; unknown (an older edge, after a restart), or one
            # we would not send (over our cap: the broker's packet limit), means upload whole
            size = h.partial_chunk_size.get(i) or self._block_chunk.get(i)
            if size is None or not min(MIN_CHUNK, self.chunk_size) <= size <= self.chunk_size:
                continue
            if h.partial_encoding.get(i, "identity") != self.encoding_of(i):
                continue  # chunks of other bytes than ours (another device's): upload whole
            self._block_chunk[i] = size
            # a hostile list must not make a chunk we cannot build
            partial[i] = sorted({c for c in missing if 0 <= c < self._chunks(i)})
        self._partial = partial
        for i, ms in h.block_ms.items():
            self.update_edge_profile(i, ms)
        if self._hello_sent is not None:
            rtt = (time.perf_counter() - self._hello_sent) * 1e3
            if self._hello_clean:
                self.observe(lambda e: e.observe_rtt(rtt))
            self._hello_sent = None
        self.inventory_seen = True
        self._inventory_count += 1
        if self._awaiting_resync:
            self._awaiting_resync = False
            self._resyncs += 1
            # blocks in flight across the reconnect that the edge does not hold: resumed from
            # what it has (the block wait resends the missing chunks)
            for i, epoch in sorted(self._sent_epoch.items()):
                if epoch < self._resyncs and i not in self.stored:
                    self.resumed_blocks.append(i)
        self._changed.notify()

    def _clear_unacked(self, block: int | None = None) -> None:
        if block is None:
            self._unacked.clear()
        else:
            for u in [u for u in self._unacked if u[0] == block]:
                del self._unacked[u]
        self.unacked_bytes = sum(self._unacked.values())
        self._open_window()

    def _open_window(self) -> None:
        for w in self._waiters:
            _open(w)

    def on_ack(self, h: UploadAck) -> None:
        # Cumulative: the edge stores a device's chunks in order, one at a time, so an ack
        # covers this block's earlier chunks too (one ack lost at QoS 0 costs nothing).
        acked = [u for u in self._unacked if u[0] == h.block and u[1] <= h.chunk]
        nbytes = 0
        for u in acked:
            nbytes += self._unacked.pop(u)
        if acked:
            self.unacked_bytes -= nbytes
            self._open_window()
        if h.block in self.peer_blocks:
            self._peer_progress = time.monotonic()
        if not h.block_done:
            if acked:
                self._observe_chunk_ack(nbytes)
                if h.chunk == self.chunk_counts.get(h.block, 0) - 1:
                    self._last_chunk_acked[h.block] = time.monotonic()
            return
        self._last_chunk_acked.pop(h.block, None)
        self._clear_unacked(h.block)
        self._block_chunk.pop(h.block, None)
        self.stored = self.stored | {h.block}
        if h.loaded:
            self._loaded = self._loaded | {h.block}
        self._partial.pop(h.block, None)
        self.update_edge_profile(h.block, h.block_ms)
        self._changed.notify()

    def _observe_chunk_ack(self, nbytes: int, run: int = 4) -> None:
        """Every ``run`` chunk acks in a row, one bandwidth sample: the bytes acked after the
        first over the time since it. A pause (the window drained, no upload) breaks the run."""
        now = time.perf_counter()
        acks = self._ack_run
        if acks and now - acks[-1][0] > 1.0:
            acks.clear()
        acks.append((now, nbytes))
        if len(acks) > run:
            span = acks[-1][0] - acks[0][0]
            if span > 0:
                rate = sum(b for _, b in acks[1:]) / span
                self.observe(lambda e: e.observe_rate(rate))
            del acks[:-1]

    def on_error(self, h: Error) -> None:
        """An error about an upload chunk of this session (``block``/``chunk``), or about an
        edge-to-edge transfer to this edge (``peer``: the transfer's other edge)."""
        if h.peer is not None:
            if h.block is None:  # this edge cannot fetch from the peer at all
                self.peer_failed = self.peer_failed | self.peer_blocks
            else:  # the peer will not push this block: send it myself
                self.peer_failed = self.peer_failed | {h.block}
            log.info("transfer to %s: %s", self.edge_id, h.message)
        elif h.block is None and h.request_id is None and h.code in _REFUSES_MODEL:
            self.refused = f"{h.code}: {h.message}"
        elif h.block is not None:
            block = h.block
            self._clear_unacked(block)
            if (
                h.code == ErrorCode.BAD_ENCODING
                and 0 <= block < self.pkg.num_blocks
                and self.encoding_of(block) != "identity"
            ):  # the edge cannot decode our upload file: the block is sent again as it is
                self._raw.add(block)
                self._resend_raw.add(block)
                self._block_chunk.pop(block, None)
                self._block_failed[block] = f"{h.code}: {h.message}"
            elif h.code != ErrorCode.STORE_FAILED:  # the edge's disk: a later retry may work
                self._block_failed[block] = f"{h.code}: {h.message}"
            if h.code == ErrorCode.QUARANTINED:  # the edge will never run it: plan without it
                self.stored = self.stored - {block}
                self._loaded = self._loaded - {block}
        self._changed.notify()

    def on_status(self, online: bool, queue_ms: float) -> None:
        self.online = online
        if online:  # the edge's own view of its queue: fresh even while we run local
            self.observe(lambda e: e.observe_status(queue_ms))

    def update_edge_profile(self, block: int, ms: float | None) -> None:
        if ms is None or ms <= 0 or not 0 <= block < self.inputs.profile.n:
            return
        self._edge_base[block] = ms
        prof = self.inputs.profile
        edge = tuple(self._edge_base.get(i, prof.edge_ms[i]) for i in range(prof.n))
        self.inputs = dataclasses.replace(
            self.inputs, profile=dataclasses.replace(prof, edge_ms=edge)
        )

    # upload ---------------------------------------------------------------------------------
    async def upload(
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
        outstanding: list[tuple[int, memoryview]] = []
        before = self.inputs.estimates  # what the device ran at before
        self._rate_Bps = rate_Bps
        try:
            return await self._upload(
                order, outstanding, progress, active, rate_Bps, block_timeout, retries, window
            )
        finally:  # what the upload cost the device is over: plans must not keep paying it
            # (the Python around a query's blocks competes with the upload's for the
            # interpreter lock, which TFLite releases: its overhead is reset alike)
            self.observe(
                lambda e: dataclasses.replace(
                    e,
                    device_factor=min(e.device_factor, before.device_factor),
                    device_overhead=min(e.device_overhead, before.device_overhead),
                )
            )

    async def _upload(
        self,
        order: list[int],
        outstanding: list[tuple[int, memoryview]],
        progress: Progress | None,
        active: Callable[[], bool],
        rate_Bps: float | None,  # noqa: N803
        block_timeout: float,
        retries: int,
        window: int,
    ) -> bool:
        for i in order:
            if not active():
                return False
            if await self._await_peer(i, active):
                continue
            if i in self.stored:
                continue
            missing = self._partial.get(i)
            data = await asyncio.get_running_loop().run_in_executor(None, self._map, i)
            if not await self._send_block(i, data, missing, progress, rate_Bps, active):
                return False
            outstanding.append((i, data))
            while len(outstanding) >= window:
                i0, d0 = outstanding.pop(0)
                await self._confirm_block(i0, d0, progress, block_timeout, retries, active)
        for i, data in outstanding:
            await self._confirm_block(i, data, progress, block_timeout, retries, active)
        self.upload_complete = active()
        return self.upload_complete

    def _map(self, i: int) -> memoryview:
        """Block i's upload file (encoded, or the .onnx), mapped: chunks are slices of it (no
        copy until the frame's). An empty or unmappable file is read instead (the edge then
        judges what it gets)."""
        path = self.pkg.onnx_path(i) if i in self._raw else self.pkg.upload_path(i)
        try:
            with path.open("rb") as f:
                return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except (ValueError, OSError):
            return memoryview(path.read_bytes())

    async def _await_peer(self, i: int, active: Callable[[], bool]) -> bool:
        """True once block i arrived from the peer edge; False when we must send it ourselves
        (not expected from the peer, the peer failed it, or the push stalled)."""
        while True:
            if i in self.stored:
                return True
            if i not in self.peer_blocks or i in self.peer_failed:
                return False
            if time.monotonic() - self._peer_progress > self.peer_stall_s:
                log.info("transfer to %s stalled: uploading block %d myself", self.edge_id, i)
                self.peer_failed = self.peer_failed | (self.peer_blocks - self.stored)
                return False
            if not active():
                return False
            await self._changed.wait_for(lambda: i in self.stored or i in self.peer_failed, 0.1)

    def _block_or_resync(self, i: int) -> bool:
        return self._done(i) or self._resyncs > self._sent_epoch.get(i, 0)

    def _done(self, i: int) -> bool:
        return i in self.stored or i in self._block_failed

    async def _confirm_block(
        self,
        i: int,
        data: memoryview,
        progress: Progress | None,
        block_timeout: float,
        retries: int,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        for attempt in range(retries):
            if not active():  # moved away: the next edge's upload takes over
                return
            if await self._wait_block(i, data, block_timeout, progress, active):
                failure = self._block_failed.pop(i, None)
                if failure and i in self._resend_raw:  # the encoding failed: send it plain
                    self._resend_raw.discard(i)
                    log.warning("block %d: %s; sending it unencoded", i, failure)
                    data = await asyncio.get_running_loop().run_in_executor(None, self._map, i)
                    await self._send_block(i, data, None, progress, active=active)
                    continue
                if failure:  # the edge refused the block: resending cannot help
                    self.upload_errors.append(f"block {i}: {failure}")
                return
            log.warning("block %d not confirmed (attempt %d); asking the edge", i, attempt + 1)
            await self._changed.wait_for(lambda: self.link.connected, block_timeout)
            self.hello(resync=True)
            await self._next_inventory(5)
            await self._send_block(i, data, self._partial.get(i), progress, active=active)
        self.upload_errors.append(f"block {i}: not confirmed after {retries} attempts")

    async def _wait_block(
        self,
        i: int,
        data: memoryview,
        timeout: float,
        progress: Progress | None,
        active: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Wait for the block's final ack; after a reconnect resend what the edge lacks. Its
        last chunk acked but no block_done for LOST_CHUNK_S: a chunk was lost (QoS 0, acks
        count cumulatively), so ask the edge once what it lacks and resend that."""
        end = time.monotonic() + timeout
        asked = False
        while not self._done(i) and time.monotonic() < end and active():
            if self._awaiting_resync and time.monotonic() - self._last_hello > 1.0:
                self.hello()  # the edge may have reconnected after our first hello
            acked = self._last_chunk_acked.get(i)
            if not asked and acked is not None and time.monotonic() - acked > LOST_CHUNK_S:
                asked = True
                self.hello()
                if await self._next_inventory(5.0):
                    missing = self._partial.get(i)
                    if missing and i not in self.stored:  # [] : all there, being checked
                        log.info("block %d: %d chunks lost on the way; resending", i, len(missing))
                        await self._send_block(i, data, missing, progress, active=active)
            await self._changed.wait_for(
                functools.partial(self._block_or_resync, i), min(0.1, end - time.monotonic())
            )
            if self._resyncs > self._sent_epoch.get(i, 0) and not self._done(i):
                missing = self._partial.get(i)
                log.info(
                    "resuming block %d: %s chunks missing",
                    i,
                    "all" if missing is None else len(missing),
                )
                await self._send_block(i, data, missing, progress)
        return self._done(i)

    def query_started(self, hold: object = None) -> bool:
        """A query's tensor to this edge is on its way; True when no chunk was ahead of it on
        the link (then its round trip measures the link). The upload goes on: the chunks sent
        after the tensor travel behind it. ``hold``: the query's expect_query token."""
        self._queries += 1
        self._last_query = time.monotonic()
        self._ack_run.clear()  # the tensor's link time is no chunk's: restart the ack run
        self.release(hold)
        return not self._unacked

    def release(self, hold: object) -> None:
        """The query of ``hold`` published its tensor, or will not (it ran locally)."""
        if hold is not None and self._holds.pop(hold, None) is not None:
            self._open_window()

    def query_done(self) -> None:
        self._queries -= 1

    def refuse_pixels(self) -> None:
        if not self.pixels_refused:
            log.info(
                "edge %s takes no pixel queries: sending block 0's float32 input", self.edge_id
            )
        self.pixels_refused = True

    def expect_query(self, hold: object, at: float, until: float) -> None:
        """A query (token ``hold``) is computing its device blocks and will publish its tensor
        to this edge at about ``at`` (perf_counter): hold chunks that would still be on the
        link then, so the tensor finds it clear; at most until ``until`` (a query late, or
        gone local without saying so)."""
        self._holds[hold] = (at, until)
        self._open_window()  # a waiting chunk re-checks against the new time

    def _hold_s(self, nbytes: int) -> float:
        """How long to hold a chunk of ``nbytes`` for an expected query (0: send it now)."""
        now = time.perf_counter()
        for k in [k for k, (_, until) in self._holds.items() if until <= now]:
            del self._holds[k]
        if not self._holds:
            return 0.0
        at, until = min(self._holds.values())  # the earliest tensor expected
        e = self.inputs.estimates
        queued = max(0.0, self.unacked_bytes - e.bandwidth_Bps * e.rtt_ms / 1e3)
        if now + (queued + nbytes) / e.bandwidth_Bps <= at:
            return 0.0  # it will have left before the tensor comes
        return until - now

    async def _wait_window(
        self, active: Callable[[], bool], nbytes: int, chunk: int, timeout: float = 10.0
    ) -> bool:
        """Wait until ``nbytes`` more fit the window (or nothing is unacked) and would leave
        the link before an expected query's tensor. An ack lost for good (broker restart)
        must not stall the upload: after ``timeout`` go on anyway."""
        end = time.monotonic() + timeout
        before = self.unacked_bytes
        while active():
            if not self.link.connected:  # a QoS 0 chunk would be dropped: wait for the link
                await self._wake(1.0)
                end = time.monotonic() + timeout
                continue
            if self.unacked_bytes < before:  # acks come: the timeout is for acks that do not
                end, before = time.monotonic() + timeout, self.unacked_bytes
            full = bool(self._unacked) and self.unacked_bytes + nbytes > self.window_bytes(chunk)
            hold = 0.0 if full else self._hold_s(nbytes)
            if not full and hold <= 0:
                break
            if not full:
                self._ack_run.clear()  # the link idles for the query: no bandwidth sample
            left = end - time.monotonic()
            if full and left <= 0:
                log.info(
                    "upload to %s: %d chunk acks missing; going on",
                    self.edge_id,
                    len(self._unacked),
                )
                self._clear_unacked()
                continue
            if full and self._awaiting_resync and time.monotonic() - self._last_hello > 1.0:
                self.hello()  # after a reconnect: the inventory reopens the window
            await self._wake(min(1.0, left) if full else min(1.0, hold))
        return active()

    async def _wake(self, timeout: float) -> None:
        """Until an ack, a query or ``timeout``. A timer, not asyncio.wait_for: this runs
        once per chunk, and wait_for makes a task each time."""
        loop = asyncio.get_running_loop()
        w: asyncio.Future[None] = loop.create_future()
        self._waiters.add(w)
        timer = loop.call_later(timeout, _open, w)
        try:
            await w
        finally:
            timer.cancel()
            self._waiters.discard(w)

    async def _send_block(
        self,
        i: int,
        data: memoryview,
        missing: list[int] | None,
        progress: Progress | None,
        rate_Bps: float | None = None,  # noqa: N803
        active: Callable[[], bool] = lambda: True,
    ) -> bool:
        b = self.pkg.blocks[i]
        epoch = self._sent_epoch[i] = self._resyncs  # a resync from here on: resent from it
        pace = self._rate_Bps if rate_Bps is None else rate_Bps  # a resend keeps the pace
        cs = self._block_chunk.get(i)
        if cs is None:  # fixed once chosen: its chunk indices keep their meaning at the edge
            # sized to the link, but never more chunks than an edge takes for one block
            fewest = math.ceil(math.ceil(len(data) / EDGE_MAX_CHUNKS) / 1024) * 1024
            cs = self._block_chunk[i] = max(self.link_chunk(), fewest)
        chunks = self.chunk_counts[i] = -(-len(data) // cs)
        todo = range(chunks) if missing is None else missing
        encoding = self.encoding_of(i)
        encoded = encoding != "identity"
        for c in todo:
            if pace:  # pace chunks: a capped upload leaves the link to the queries
                self._ack_run.clear()  # acks measure the pace, not the link
                wait = self._pace_until - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not active():
                    return False
            body = data[c * cs : (c + 1) * cs]
            if not await self._wait_window(active, len(body), cs):
                return False
            if i in self.stored:  # done meanwhile (a pass from before a reconnect got through)
                return True
            if self._resyncs != epoch:
                # a reconnect while this pass waited: the block's wait resends what the
                # inventory says is missing (this chunk on); going on here would send it twice
                return True
            h = UploadChunk(
                device=self.device_id,
                model_id=self.pkg.manifest.model_id,
                block=i,
                block_sha256=b.onnx_sha256,
                block_bytes=b.onnx_bytes if encoded else len(data),
                chunk=c,
                chunks=chunks,
                chunk_size=cs,
                encoding=encoding,
                stream_bytes=len(data) if encoded else None,
            )
            # every chunk is acked when stored (the last one too, before the edge checks and
            # loads the block: that ack comes later, with block_done)
            self.unacked_bytes += len(body) - self._unacked.get((i, c), 0)  # a resend: once
            self._unacked[(i, c)] = len(body)
            # QoS 0: the edge's ack is the delivery receipt the window waits for, and a
            # chunk lost with a connection is resent from the inventory that answers the
            # reconnect; a broker PUBACK per chunk would only cost both sides a packet
            self.link.publish(
                self.topics.edge_upload(self.edge_id, self.device_id), encode(h, body), qos=0
            )
            if pace:
                self._pace_until = max(self._pace_until, time.monotonic()) + len(body) / pace
            self.bytes_uploaded += len(body)
            self.chunks_sent[i] = self.chunks_sent.get(i, 0) + 1
            if progress:
                progress(i, len(body))
        return True


def _open(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_result(None)


def fresh_estimates(like: Estimates) -> Estimates:
    """A new edge's starting estimates: the link's bandwidth as measured so far, no load."""
    return Estimates(
        bandwidth_Bps=like.bandwidth_Bps,
        rtt_ms=like.rtt_ms,
        alpha=like.alpha,
        device_factor=like.device_factor,  # the device's own speed goes with it
        device_overhead=like.device_overhead,
    )
