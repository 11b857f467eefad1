"""The device agent: uploads its model's blocks to an edge and offloads queries meanwhile."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from iotoffload.model.package import ModelPackage
from iotoffload.planning import (
    Estimates,
    Objective,
    Plan,
    PlanningInputs,
    chain_profile,
    make_planner,
    measure_device_ms,
    single_split_plan,
)
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
    plan: str = ""
    predicted_ms: float = 0.0


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
        planner: str = "auto",
        objective: Objective = "latency",
        min_local: int = 0,
        edge_speed: float = 1.0,
        device_ms: list[float] | None = None,
        estimates: Estimates | None = None,
        reprofile: bool = False,
    ) -> None:
        self.pkg = pkg
        self.edge_id = check_id("edge", edge_id)
        self.device_id = check_id("device", device_id or f"dev-{uuid.uuid4().hex[:8]}")
        n = pkg.num_blocks
        if split is not None and not 0 <= split <= n:
            raise ValueError(f"split must be within 0..{n}")
        if not 0 <= min_local <= n:
            raise ValueError(f"min_local must be within 0..{n}")
        self.fixed_split = split  # a fixed split overrides the planner's per-query choice
        self.topics = Topics(prefix)
        self.chunk_size = chunk_size
        self.tfl = TFLiteExecutor.from_package(pkg, threads=tflite_threads)
        self.planner = make_planner(planner)
        d = device_ms or measure_device_ms(pkg, self.tfl, reprofile=reprofile)
        self._edge_base: dict[int, float] = {}  # block -> edge's reported unloaded ms
        self._edge_speed = edge_speed
        self.inputs = PlanningInputs(
            chain_profile(pkg, d, edge_speed=edge_speed),
            estimates or Estimates(),
            objective=objective,
            min_local=min_local,
        )
        self.split = split if split is not None else self._predicted_split()
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
        self._sent_at: dict[int, tuple[float, int]] = {}  # block -> (first send, bytes)
        self._last_query = 0.0
        self._probe_stop = threading.Event()

    def _predicted_split(self) -> int:
        """Where the planner would cut with every block on the edge (for display)."""
        return self.planner.plan(self.inputs, frozenset(range(self.pkg.num_blocks))).split

    def auto_deadline_ms(self, start: int, predicted_ms: float = 0.0) -> float:
        """Wait for the edge about twice what finishing locally from ``start`` would take (or
        the plan's prediction, whichever is larger)."""
        local = sum(self.inputs.profile.device_ms[start:])
        return max(100.0, 2.0 * max(local, predicted_ms) + 50.0)

    def current_plan(self) -> Plan:
        """The plan for the next query, over the blocks the edge holds now."""
        with self._lock:
            avail = frozenset(self._stored)
        if self.fixed_split is not None:  # missing blocks make it finish locally, saying so
            return single_split_plan(self.inputs, max(self.fixed_split, self.inputs.min_local))
        return self.planner.plan(self.inputs, avail)

    def _update_edge_profile(self, block: int, ms: float | None) -> None:
        if ms is None or ms <= 0:
            return
        self._edge_base[block] = ms
        prof = self.inputs.profile
        edge = tuple(self._edge_base.get(i, prof.edge_ms[i]) for i in range(prof.n))
        self.inputs = dataclasses.replace(self.inputs, profile=dataclasses.replace(
            prof, edge_ms=edge))  # fmt: skip

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
        t0 = time.perf_counter()
        self.link.publish(self.topics.edge_control(self.edge_id), encode(announce))
        if not self._inventory.wait(timeout):
            log.warning("edge %s did not answer the announce", self.edge_id)
            return None
        self.inputs.estimates.observe_rtt((time.perf_counter() - t0) * 1e3)
        threading.Thread(target=self._probe_loop, name="probe", daemon=True).start()
        return self.inventory

    def probe(self, timeout: float = 2.0) -> float | None:
        """One light RTT probe (hello → inventory); also refreshes the edge's inventory."""
        t0 = time.perf_counter()
        self._hello()
        if not self._inventory.wait(timeout):
            return None
        ms = (time.perf_counter() - t0) * 1e3
        self.inputs.estimates.observe_rtt(ms)
        return ms

    def _probe_loop(self, interval: float = 5.0) -> None:
        # Replies keep the estimates fresh while queries flow; probe only when idle.
        while not self._probe_stop.wait(interval):
            if time.monotonic() - self._last_query > interval and self.link.connected:
                self.probe()

    @property
    def inventory(self) -> Inventory:
        with self._lock:
            return Inventory(model_id=self.pkg.manifest.model_id, known=True,
                             stored=sorted(self._stored), loaded=sorted(self._loaded),
                             partial=dict(self._partial))  # fmt: skip

    def close(self) -> None:
        self._probe_stop.set()
        self.link.close()

    # upload ---------------------------------------------------------------------------------
    def upload_order(self) -> list[int]:
        n = self.pkg.num_blocks
        if self.fixed_split is not None:
            return [*range(self.fixed_split, n), *range(0, self.fixed_split)]
        order = self.planner.upload_order(self.inputs)
        return order + [i for i in range(n) if i not in order]  # the rest, later

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
            status = json.loads(payload)
            state = status.get("state")
            queue_ms = float(status.get("load", {}).get("queue_ms", 0.0))
        except (ValueError, AttributeError, TypeError):
            return
        self.edge_online = state == "online"
        if self.edge_online:  # the edge's own view of its queue: fresh even while we run local
            self.inputs.estimates.observe_status(queue_ms)
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
        self._sent_at[i] = (time.perf_counter(), len(data))
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
        """Run one query by the current plan; an edge segment that fails (deadline, error,
        edge offline) is finished on the device. Exactly one answer, always."""
        n = self.pkg.num_blocks
        plan = single_split_plan(self.inputs, split) if split is not None else self.current_plan()
        t0 = time.perf_counter()
        self._last_query = time.monotonic()
        y = x
        front_ms = 0.0
        offloaded = False
        reason = "planned local" if not plan.offloads else "edge"
        info: dict[str, float] = {}
        for seg in plan.segments:
            if seg.where == "device":
                y, times = self.tfl.run_timed(seg.start, seg.end, y)
                if not offloaded:
                    front_ms += sum(times) * 1e3
                continue
            why = self._why_not_remote(seg.start, seg.end)
            got = None if why else self._remote(seg.start, seg.end, y, plan.latency_ms, info)
            if isinstance(got, str) or got is None:
                reason = why or str(got)
                y = self.tfl.run(seg.start, n, y)  # finish on the device
                break
            y, offloaded = got, True
        out = QueryOutcome(index, y, (time.perf_counter() - t0) * 1e3, plan.split, offloaded,
                           reason, front_ms)  # fmt: skip
        out.plan, out.predicted_ms = plan.describe(), plan.latency_ms
        out.edge_queue_ms = info.get("queue_ms")
        out.edge_exec_ms = info.get("exec_ms")
        out.wire_bytes = int(info.get("wire_bytes", 0))
        return out

    def _why_not_remote(self, start: int, end: int) -> str:
        if not self.link.connected:
            return "broker unreachable"
        if not self.edge_online:
            return "edge offline"
        if not self.edge_ready(start, end):
            return "blocks not uploaded yet"
        return ""

    def _remote(
        self, start: int, end: int, x: Array, predicted_ms: float, info: dict[str, float]
    ) -> Array | str:
        """Run [start, end) on the edge: the output, or why not."""
        rid = f"{self.device_id}-{next(self._ids)}"
        deadline = self.deadline_ms or self.auto_deadline_ms(start, predicted_ms)
        pend = _Pending()
        with self._lock:
            self._pending[rid] = pend
        payload = encode_tensor_frame(
            Query, x, request_id=rid, device=self.device_id,
            model_id=self.pkg.manifest.model_id, start=start, end=end, deadline_ms=deadline,
        )  # fmt: skip
        t_send = time.perf_counter()
        self.link.publish(self.topics.edge_query(self.edge_id), payload, expiry_s=deadline / 1e3)
        pend.event.wait(deadline / 1e3)
        rt_ms = (time.perf_counter() - t_send) * 1e3
        with self._lock:
            self._pending.pop(rid, None)  # from here on, a late answer is ignored
        if pend.result is None:
            if pend.error:
                return f"edge error: {pend.error.code}"
            if not self.edge_online:
                return "edge went offline"
            self.inputs.estimates.observe_timeout(deadline)
            return "deadline passed"
        h, body = pend.result
        y = np.array(tensor_of(h, body))
        info["queue_ms"] = info.get("queue_ms", 0.0) + h.queue_ms
        info["exec_ms"] = info.get("exec_ms", 0.0) + h.exec_ms
        info["wire_bytes"] = info.get("wire_bytes", 0.0) + len(payload)
        self._learn(start, end, len(payload) + y.nbytes, rt_ms, h)
        return y

    def _learn(self, start: int, end: int, nbytes: int, rt_ms: float, h: Result) -> None:
        """Keep the estimates fresh from the reply itself (LoADPart): no probe traffic."""
        est = self.inputs.estimates
        est.observe_round_trip(nbytes, rt_ms - h.queue_ms - h.exec_ms)
        base = sum(self.inputs.profile.edge_ms[start:end])
        est.observe_reply(h.exec_ms, base, h.queue_ms)

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
            for i, ms in h.block_ms.items():
                self._update_edge_profile(i, ms)
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
            self._update_edge_profile(h.block, h.block_ms)
            sent = self._sent_at.pop(h.block, None)
            if sent is not None:  # a lower bound: the time includes the edge's checks
                self.inputs.estimates.observe_transfer(
                    sent[1], (time.perf_counter() - sent[0]) * 1e3)  # fmt: skip
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
