"""The device agent: uploads its model's blocks to an edge and offloads queries meanwhile."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iotoffload.model.package import ModelPackage
from iotoffload.runtime.base import Array
from iotoffload.runtime.tflite import TFLiteExecutor
from iotoffload.transport.frame import (
    Announce,
    BlockInfo,
    Error,
    FrameError,
    Hello,
    Inventory,
    Query,
    Result,
    UploadAck,
    UploadChunk,
    decode,
    encode,
    encode_tensor_frame,
    tensor_of,
)
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.topics import Topics, check_id

log = logging.getLogger(__name__)
DEFAULT_CHUNK = 256 * 1024  # well under mosquitto 2.1's 2 MB and EMQX's 1 MB packet caps


def auto_split(pkg: ModelPackage) -> int:
    """Placeholder rule until the planner lands: cut at the smallest boundary tensor."""
    n = pkg.num_blocks
    return min(range(1, n), key=lambda k: (pkg.blocks[k - 1].output_bytes, k)) if n > 1 else 0


@dataclass
class QueryOutcome:
    index: int
    output: Array
    latency_ms: float
    split: int
    offloaded: bool
    reason: str  # "edge", or why it ran locally
    front_ms: float = 0.0
    edge_queue_ms: float | None = None
    edge_exec_ms: float | None = None
    wire_bytes: int = 0


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    result: tuple[Result, memoryview] | None = None
    error: Error | None = None


class DeviceAgent:
    def __init__(
        self,
        pkg: ModelPackage,
        broker_url: str,
        edge_id: str,
        *,
        device_id: str | None = None,
        split: int | None = None,
        protocol: int = 5,
        prefix: str = "iotoffload/v1",
        chunk_size: int = DEFAULT_CHUNK,
        deadline_ms: float | None = None,
        tflite_threads: int = 1,
    ) -> None:
        self.pkg = pkg
        self.edge_id = check_id("edge", edge_id)
        self.device_id = check_id("device", device_id or f"dev-{uuid.uuid4().hex[:8]}")
        n = pkg.num_blocks
        self.split = auto_split(pkg) if split is None else split
        if not 0 <= self.split <= n:
            raise ValueError(f"split must be within 0..{n}")
        self.topics = Topics(prefix)
        self.chunk_size = chunk_size
        self.tfl = TFLiteExecutor.from_package(pkg, threads=tflite_threads)
        self.link = MqttLink(broker_url, f"device-{self.device_id}", protocol=protocol)
        self._stored: set[int] = set()
        self._loaded: set[int] = set()
        self._partial: dict[int, list[int]] = {}
        self._inventory = threading.Event()
        self._block_done: dict[int, threading.Event] = {}
        self._block_failed: dict[int, str] = {}
        self._resync = threading.Event()  # an inventory arrived after a reconnect
        self._awaiting_resync = False
        self._last_hello = 0.0
        self.edge_online = True
        self.chunks_sent: dict[int, int] = {}
        self.resumed_blocks: list[int] = []
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.bytes_uploaded = 0
        self.upload_errors: list[str] = []
        self.deadline_ms = deadline_ms
        self._upload_thread: threading.Thread | None = None
        self._local_ms: list[float] | None = None

    def local_block_ms(self) -> list[float]:
        """Per-block local (TFLite) time, measured once on a zero input (median of 3)."""
        if self._local_ms is None:
            x = np.zeros(self.pkg.manifest.input.shape, self.pkg.manifest.input.dtype)
            runs = [self.tfl.run_timed(0, self.pkg.num_blocks, x)[1] for _ in range(3)]
            self._local_ms = [float(v) * 1e3 for v in np.median(np.asarray(runs), axis=0)]
        return self._local_ms

    def auto_deadline_ms(self, k: int) -> float:
        """Wait for the edge at most about twice what finishing locally would take."""
        return max(100.0, 2.0 * sum(self.local_block_ms()[k:]) + 50.0)

    # connection -----------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> Inventory | None:
        self.link.subscribe(self.topics.device_inbox(self.device_id), self._on_inbox)
        self.link.subscribe(self.topics.edge_status(self.edge_id), self._on_status)
        self.link.on_reconnect.append(self._after_reconnect)
        self.link.connect(timeout)
        m = self.pkg.manifest
        announce = Announce(
            device=self.device_id, model_id=m.model_id, name=m.name,
            blocks=[BlockInfo(onnx_sha256=b.onnx_sha256, onnx_bytes=b.onnx_bytes,
                              input=b.input, output=b.output) for b in m.blocks],
        )  # fmt: skip
        self._inventory.clear()
        self.link.publish(self.topics.edge_control(self.edge_id), encode(announce))
        if not self._inventory.wait(timeout):
            log.warning("edge %s did not answer the announce", self.edge_id)
            return None
        return self.inventory

    @property
    def inventory(self) -> Inventory:
        with self._lock:
            return Inventory(model_id=self.pkg.manifest.model_id, known=True,
                             stored=sorted(self._stored), loaded=sorted(self._loaded),
                             partial=dict(self._partial))  # fmt: skip

    def close(self) -> None:
        self.link.close()

    # upload ---------------------------------------------------------------------------------
    def upload_order(self) -> list[int]:
        n = self.pkg.num_blocks
        return [*range(self.split, n), *range(0, self.split)]

    def start_upload(self, progress: Callable[[int, int], None] | None = None) -> None:
        self._upload_thread = threading.Thread(
            target=self.upload, args=(progress,), name="uploader", daemon=True
        )
        self._upload_thread.start()

    def wait_upload(self, timeout: float | None = None) -> bool:
        if self._upload_thread:
            self._upload_thread.join(timeout)
            return not self._upload_thread.is_alive()
        return True

    def upload(
        self,
        progress: Callable[[int, int], None] | None = None,
        *,
        block_timeout: float = 30.0,
        retries: int = 3,
        window: int = 2,
    ) -> None:
        """Send every block the edge lacks, in upload order; resume partial blocks.

        Up to ``window`` blocks are in flight: the next block travels while the edge checks,
        screens and loads the previous one.
        """
        outstanding: list[tuple[int, bytes]] = []
        for i in self.upload_order():
            with self._lock:
                if i in self._stored:
                    continue
                missing = self._partial.get(i)
                self._block_done.setdefault(i, threading.Event())
            data = self.pkg.onnx_path(i).read_bytes()
            self._send_block(i, data, missing, progress)
            outstanding.append((i, data))
            while len(outstanding) >= window:
                self._confirm_block(*outstanding.pop(0), progress, block_timeout, retries)
        for i, data in outstanding:
            self._confirm_block(i, data, progress, block_timeout, retries)

    def _confirm_block(
        self,
        i: int,
        data: bytes,
        progress: Callable[[int, int], None] | None,
        block_timeout: float,
        retries: int,
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
            self._hello()
            self._inventory.wait(5)
            with self._lock:
                missing = self._partial.get(i)
            self._send_block(i, data, missing, progress)
        self.upload_errors.append(f"block {i}: not confirmed after {retries} attempts")

    def _wait_block(
        self,
        i: int,
        data: bytes,
        ev: threading.Event,
        timeout: float,
        progress: Callable[[int, int], None] | None,
    ) -> bool:
        """Wait for the block's final ack; after a reconnect resend what the edge lacks."""
        end = time.monotonic() + timeout
        while not ev.is_set() and time.monotonic() < end:
            if self._awaiting_resync and time.monotonic() - self._last_hello > 1.0:
                self._hello()  # the edge may have reconnected after our first hello
            if self._resync.wait(0.1):
                self._resync.clear()
                with self._lock:
                    stored, missing = i in self._stored, self._partial.get(i)
                if not stored:
                    self.resumed_blocks.append(i)
                    log.info("resuming block %d: %s chunks missing", i,
                             "all" if missing is None else len(missing))  # fmt: skip
                    self._send_block(i, data, missing, progress)
        return ev.is_set()

    def _after_reconnect(self) -> None:
        self._awaiting_resync = True
        self._hello()  # the inventory answer sets _resync

    def _on_status(self, _t: str, payload: bytes) -> None:
        try:
            state = json.loads(payload).get("state")
        except (ValueError, AttributeError):
            return
        self.edge_online = state == "online"
        if not self.edge_online:  # release waiting queries at once: they finish locally
            with self._lock:
                waiting = list(self._pending.values())
            for p in waiting:
                p.event.set()

    def _hello(self) -> None:
        self._last_hello = time.monotonic()
        self._inventory.clear()
        hello = Hello(device=self.device_id, model_id=self.pkg.manifest.model_id)
        self.link.publish(self.topics.edge_control(self.edge_id), encode(hello))

    def _send_block(
        self,
        i: int,
        data: bytes,
        missing: list[int] | None,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        b = self.pkg.blocks[i]
        chunks = -(-len(data) // self.chunk_size)
        todo = range(chunks) if missing is None else missing
        for c in todo:
            body = data[c * self.chunk_size : (c + 1) * self.chunk_size]
            h = UploadChunk(device=self.device_id, model_id=self.pkg.manifest.model_id, block=i,
                            block_sha256=b.onnx_sha256, block_bytes=len(data), chunk=c,
                            chunks=chunks, chunk_size=self.chunk_size)  # fmt: skip
            self.link.publish(self.topics.edge_upload(self.edge_id), encode(h, body))
            self.bytes_uploaded += len(body)
            self.chunks_sent[i] = self.chunks_sent.get(i, 0) + 1
            if progress:
                progress(i, len(body))

    # queries --------------------------------------------------------------------------------
    def edge_ready(self, start: int, end: int) -> bool:
        with self._lock:
            return all(i in self._stored for i in range(start, end))

    def query(self, x: Array, index: int = 0, split: int | None = None) -> QueryOutcome:
        n = self.pkg.num_blocks
        k = self.split if split is None else split
        t0 = time.perf_counter()
        mid, front = self.tfl.run_timed(0, k, x)
        front_ms = sum(front) * 1e3
        if k == n:
            return self._done(index, mid, t0, k, False, "split at the end", front_ms)
        if not self.link.connected:
            return self._local(index, mid, t0, k, "broker unreachable", front_ms)
        if not self.edge_online:
            return self._local(index, mid, t0, k, "edge offline", front_ms)
        if not self.edge_ready(k, n):
            return self._local(index, mid, t0, k, "blocks not uploaded yet", front_ms)
        rid = f"{self.device_id}-{next(self._ids)}"
        deadline = self.deadline_ms or self.auto_deadline_ms(k)
        pend = _Pending()
        with self._lock:
            self._pending[rid] = pend
        payload = encode_tensor_frame(
            Query, mid, request_id=rid, device=self.device_id,
            model_id=self.pkg.manifest.model_id, start=k, end=n, deadline_ms=deadline,
        )  # fmt: skip
        self.link.publish(self.topics.edge_query(self.edge_id), payload, expiry_s=deadline / 1e3)
        pend.event.wait(deadline / 1e3)
        with self._lock:
            self._pending.pop(rid, None)  # from here on, a late answer is ignored
        if pend.result is not None:
            h, body = pend.result
            y = np.array(tensor_of(h, body))
            out = self._done(index, y, t0, k, True, "edge", front_ms)
            out.edge_queue_ms, out.edge_exec_ms = h.queue_ms, h.exec_ms
            out.wire_bytes = len(payload)
            return out
        if pend.error:
            reason = f"edge error: {pend.error.code}"
        else:
            reason = "deadline passed" if self.edge_online else "edge went offline"
        return self._local(index, mid, t0, k, reason, front_ms)

    def _local(
        self, index: int, mid: Array, t0: float, k: int, reason: str, front_ms: float
    ) -> QueryOutcome:
        y = self.tfl.run(k, self.pkg.num_blocks, mid)
        return self._done(index, y, t0, k, False, reason, front_ms)

    @staticmethod
    def _done(
        index: int, y: Array, t0: float, k: int, off: bool, reason: str, front_ms: float
    ) -> QueryOutcome:
        return QueryOutcome(index, y, (time.perf_counter() - t0) * 1e3, k, off, reason, front_ms)

    # inbox (network thread) -----------------------------------------------------------------
    def _on_inbox(self, _t: str, payload: bytes) -> None:
        try:
            h, body = decode(payload)
        except FrameError as e:
            log.warning("bad frame from the edge: %s", e)
            return
        if isinstance(h, Inventory) and h.model_id == self.pkg.manifest.model_id:
            with self._lock:
                self._stored, self._loaded = set(h.stored), set(h.loaded)
                self._partial = dict(h.partial)
                for i in h.stored:
                    self._block_done.setdefault(i, threading.Event()).set()
            self._inventory.set()
            if self._awaiting_resync:
                self._awaiting_resync = False
                self._resync.set()
        elif isinstance(h, UploadAck) and h.block_done:
            with self._lock:
                self._stored.add(h.block)
                if h.loaded:
                    self._loaded.add(h.block)
                self._partial.pop(h.block, None)
                self._block_done.setdefault(h.block, threading.Event()).set()
        elif isinstance(h, Result | Error):
            rid = h.request_id
            with self._lock:
                pend = self._pending.get(rid) if rid else None
            if pend is None:
                if isinstance(h, Error):
                    log.warning("edge error %s: %s", h.code, h.message)
                    if rid and rid.startswith("upload:"):
                        block = int(rid.split(":")[1])
                        with self._lock:
                            self._block_failed[block] = f"{h.code}: {h.message}"
                            self._block_done.setdefault(block, threading.Event()).set()
                return
            if isinstance(h, Result):
                pend.result = (h, body)
            else:
                pend.error = h
            pend.event.set()

    def describe(self) -> dict[str, Any]:
        return {"device": self.device_id, "edge": self.edge_id, "split": self.split}
