"""The edge agent: stores uploaded blocks, runs block ranges for devices, reports its load."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import EdgeConfig
from edge_agent.peers import PeerTransfers
from edge_agent.screen import screen_onnx
from edge_agent.store import BlockStore, StoreError
from iotoffload import __version__
from iotoffload.discovery import EdgeAdvertiser
from iotoffload.runtime.base import BlockFile, BlockRangeError, RuntimeInputError
from iotoffload.runtime.onnx import OnnxExecutor
from iotoffload.transport.frame import (
    Announce,
    Error,
    FrameError,
    Hello,
    Inventory,
    PeerFetch,
    Query,
    Result,
    Transfer,
    UploadAck,
    UploadChunk,
    decode,
    encode,
    encode_tensor_frame,
    tensor_of,
)
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class _Job:
    kind: str  # "query" | "load"
    enqueued: float
    header: Any = None
    body: memoryview | None = None
    sha: str = ""
    ack: UploadAck | None = None
    device: str = ""


@dataclass
class EdgeStats:
    queries: int = 0
    errors: int = 0
    chunks: int = 0
    blocks_stored: int = 0
    blocks_from_peers: int = 0
    queue_ms_ewma: float = 0.0
    exec_ms_ewma: float = 0.0
    in_flight: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)


class EdgeAgent:
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.store = BlockStore(
            config.store, max_block_bytes=config.max_block_bytes, screen=screen_onnx
        )
        self.stats = EdgeStats()
        self._executors: dict[str, OnnxExecutor] = {}
        self._block_ms: dict[str, float] = {}  # sha256 -> unloaded time, ms
        self._exec_lock = threading.Lock()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        # blocks are checked, screened and loaded on a thread of their own: a query never
        # waits behind a 100 MB block (nor does the network thread)
        self._loads: queue.Queue[_Job | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._loader: threading.Thread | None = None
        self._stop = threading.Event()
        self._status_thread: threading.Thread | None = None
        self.link: MqttLink | None = None
        self.broker_url = config.broker or ""
        self._advertiser: EdgeAdvertiser | None = None
        self.peers = PeerTransfers(
            config.id,
            self.topics,
            own_link=self._link,
            own_broker=lambda: self.broker_url,
            on_upload=self._on_upload,
            block_path=self._stored_block,
            reply_error=lambda dev, e: self._error(dev, e.code, e.message, e.request_id),
            allowed_brokers=config.peer_brokers,
            protocol=config.protocol,
            chunk_bytes=config.transfer_chunk_bytes,
        )

    def _link(self) -> MqttLink:
        assert self.link is not None, "the edge is not started"
        return self.link

    def _stored_block(self, model_id: str, i: int) -> tuple[str, Path] | None:
        a = self.store.model(model_id)
        if (
            a is None
            or not 0 <= i < len(a.blocks)
            or not self.store.has_block(a.blocks[i].onnx_sha256)
        ):
            return None
        sha = a.blocks[i].onnx_sha256
        return sha, self.store.block_path(sha)

    # lifecycle ----------------------------------------------------------------------------
    def start(self, broker_url: str | None = None) -> None:
        self.broker_url = broker_url or self.config.broker or self.broker_url
        if not self.broker_url:
            raise ValueError("no broker URL")
        cid = self.config.id
        self.link = MqttLink(
            self.broker_url,
            f"edge-{cid}",
            protocol=self.config.protocol,
            will=(self.topics.edge_status(cid), self._status_json("offline"), True),
        )
        self.link.subscribe(self.topics.edge_control(cid), self._on_control)
        self.link.subscribe(self.topics.edge_upload(cid), self._on_upload)
        self.link.subscribe(self.topics.edge_query(cid), self._on_query)
        self.link.on_reconnect.append(self.publish_status)  # a restarted broker lost it
        self.link.connect()
        for i in range(self.config.workers):
            t = threading.Thread(
                target=self._work, args=(self._jobs,), name=f"edge-worker-{i}", daemon=True
            )
            t.start()
            self._workers.append(t)
        loader = threading.Thread(
            target=self._work, args=(self._loads,), name="edge-loader", daemon=True
        )
        loader.start()
        self._loader = loader
        self._status_thread = threading.Thread(target=self._status_loop, daemon=True)
        self._status_thread.start()
        self.publish_status()
        if self.config.advertise:
            advertiser = EdgeAdvertiser(cid, self.broker_url, self.config.interface)
            try:
                advertiser.register(self.load_factor())
            except ValueError:
                self.stop()
                raise
            self._advertiser = advertiser
        log.info("edge %s online at %s, store %s", cid, self.broker_url, self.config.store)

    def load_factor(self) -> float:
        """Coarse load for discovery: queued plus running queries per worker."""
        return (self._jobs.qsize() + self.stats.in_flight) / self.config.workers

    def stop(self) -> None:
        self._stop.set()
        if self._advertiser:
            self._advertiser.close()
            self._advertiser = None
        for _ in self._workers:
            self._jobs.put(None)
        self._loads.put(None)
        for t in [*self._workers, *([self._loader] if self._loader else [])]:
            t.join(5)
        self.peers.close()
        if self.link:
            if self.link.connected:
                info = self.link.publish(
                    self.topics.edge_status(self.config.id),
                    self._status_json("offline"),
                    retain=True,
                )
                info.wait_for_publish(2)
            self.link.close()

    # status -------------------------------------------------------------------------------
    def _status_json(self, state: str) -> bytes:
        return json.dumps(
            {
                "state": state,
                "edge": self.config.id,
                "version": __version__,
                "broker": self.broker_url,
                "protocol": self.config.protocol,
                "load": {
                    "queue": self._jobs.qsize(),
                    "in_flight": self.stats.in_flight,
                    "queue_ms": round(self.stats.queue_ms_ewma, 3),
                    "exec_ms": round(self.stats.exec_ms_ewma, 3),
                },
                "models": self.store.model_ids(),
                "blocks": len(self.store.block_digests()),
                "transfer": {
                    "blocks_pushed": self.peers.blocks_pushed,
                    "blocks_from_peers": self.stats.blocks_from_peers,
                },
                "providers": ["CPUExecutionProvider"],
                "time": time.time(),
            }
        ).encode()

    def publish_status(self) -> None:
        if self.link and self.link.connected:
            self.link.publish(
                self.topics.edge_status(self.config.id), self._status_json("online"), retain=True
            )

    def _status_loop(self) -> None:
        advertised = 0.0
        served = self.stats.queries
        while not self._stop.wait(self.config.status_interval):
            if self.stats.queries == served and not self._jobs.qsize():
                # idle since the last status: the queueing estimate fades out
                self.stats.queue_ms_ewma *= 0.5
                self.stats.exec_ms_ewma *= 0.5
            served = self.stats.queries
            self.publish_status()
            load = self.load_factor()
            if self._advertiser and abs(load - advertised) >= 0.5:  # TXT updates are multicast
                self._advertiser.update(load)
                advertised = load

    # helpers ------------------------------------------------------------------------------
    def _reply(self, device: str, header: Any, body: bytes = b"") -> None:
        assert self.link is not None
        self.link.publish(self.topics.device_inbox(device), encode(header, body))

    def _error(self, device: str | None, code: str, msg: str, rid: str | None = None) -> None:
        self.stats.errors += 1
        self.stats.error_codes[code] = self.stats.error_codes.get(code, 0) + 1
        log.warning("error %s for %s: %s", code, device or "?", msg)
        if device:
            self._reply(device, Error(request_id=rid, code=code, message=msg, edge=self.config.id))

    def executor(self, model_id: str) -> OnnxExecutor | None:
        with self._exec_lock:
            ex = self._executors.get(model_id)
            if ex is None:
                a = self.store.model(model_id)
                if a is None:
                    return None
                files = [
                    BlockFile(self.store.block_path(b.onnx_sha256), b.input, b.output)
                    for b in a.blocks
                ]
                ex = OnnxExecutor(files, threads=self.config.threads)
                self._executors[model_id] = ex
            return ex

    def inventory(self, model_id: str) -> Inventory:
        a = self.store.model(model_id)
        if a is None:
            return Inventory(model_id=model_id, known=False, edge=self.config.id)
        ex = self.executor(model_id)
        stored = [i for i, b in enumerate(a.blocks) if self.store.has_block(b.onnx_sha256)]
        partial = {}
        for i, b in enumerate(a.blocks):
            missing = self.store.missing_chunks(b.onnx_sha256)
            if missing is not None and i not in stored:
                partial[i] = missing
        block_ms = {
            i: self._block_ms[b.onnx_sha256]
            for i, b in enumerate(a.blocks)
            if b.onnx_sha256 in self._block_ms
        }
        return Inventory(
            model_id=model_id,
            known=True,
            stored=stored,
            loaded=ex.loaded if ex else [],
            partial=partial,
            block_ms=block_ms,
            edge=self.config.id,
        )

    # handlers (network thread: quick) -----------------------------------------------------
    def _decode(self, payload: bytes) -> tuple[Any, memoryview] | None:
        try:
            return decode(payload, max_body=self.config.max_block_bytes)
        except FrameError as e:
            self._error(e.device, e.code, str(e), e.request_id)
            return None

    def _on_control(self, _t: str, payload: bytes) -> None:
        d = self._decode(payload)
        if d is None:
            return
        h = d[0]
        if isinstance(h, Announce):
            try:
                self.store.put_model(h)
            except StoreError as e:
                self._error(h.device, e.code, str(e))
                return
            self._reply(h.device, self.inventory(h.model_id))
            self.publish_status()
        elif isinstance(h, Hello):
            self._reply(h.device, self.inventory(h.model_id))
        elif isinstance(h, Transfer):
            if self.store.model(h.model_id) is None:
                self._error(h.device, "unknown_model", "announce the model before a transfer")
                return
            self.peers.pull(h)
        elif isinstance(h, PeerFetch):
            self.peers.push(h)
        else:
            self._error(getattr(h, "device", None), "unexpected", f"{h.type} on the control topic")

    def _on_upload(self, _t: str, payload: bytes) -> None:
        d = self._decode(payload)
        if d is None:
            return
        h, body = d
        if not isinstance(h, UploadChunk):
            self._error(getattr(h, "device", None), "unexpected", f"{h.type} on the upload topic")
            return
        self.stats.chunks += 1
        try:
            done = self.store.put_chunk(h, body, finish=False)
        except StoreError as e:
            self._error(h.device, e.code, str(e), f"upload:{h.block}:{h.chunk}")
            return
        ack = UploadAck(
            model_id=h.model_id,
            block=h.block,
            chunk=h.chunk,
            block_done=done,
            loaded=False,
            edge=self.config.id,
        )
        if done:
            self._loads.put(
                _Job(
                    "load",
                    time.perf_counter(),
                    header=h,
                    sha=h.block_sha256,
                    ack=ack,
                    device=h.device,
                )
            )
        else:
            self._reply(h.device, ack)

    def _on_query(self, _t: str, payload: bytes) -> None:
        d = self._decode(payload)
        if d is None:
            return
        h, body = d
        if not isinstance(h, Query):
            self._error(getattr(h, "device", None), "unexpected", f"{h.type} on the query topic")
            return
        self._jobs.put(_Job("query", time.perf_counter(), header=h, body=body, device=h.device))

    # workers ------------------------------------------------------------------------------
    def _work(self, jobs: queue.Queue[_Job | None]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                if job.kind == "load":
                    self._load(job)
                else:
                    self._run_query(job)
            except Exception as e:  # never let one job kill the worker
                log.exception("job failed")
                rid = getattr(job.header, "request_id", None)
                self._error(job.device, "internal", f"{type(e).__name__}: {e}", rid)

    def _load(self, job: _Job) -> None:
        assert job.ack is not None
        h: UploadChunk = job.header
        fresh = not self.store.has_block(h.block_sha256)
        try:
            self.store.finish_block(h)
        except StoreError as e:
            self._error(h.device, e.code, str(e), f"upload:{h.block}:{h.chunk}")
            return
        if fresh:
            self.stats.blocks_stored += 1
            if h.source:
                self.stats.blocks_from_peers += 1
        loaded = False
        ex = self.executor(job.ack.model_id)
        a = self.store.model(job.ack.model_id)
        ms = None
        if ex is not None and a is not None:
            for i, b in enumerate(a.blocks):
                if b.onnx_sha256 == job.sha:
                    ex.load(i)
                    ms = self._profile_block(ex, job.sha, i)
                    loaded = True
        self._reply(job.device, job.ack.model_copy(update={"loaded": loaded, "block_ms": ms}))
        self.publish_status()

    def _profile_block(self, ex: OnnxExecutor, sha: str, i: int) -> float:
        """The block's unloaded time (median of 3 runs on zeros), the base of the load factor
        devices compute from every reply (LoADPart)."""
        if sha not in self._block_ms:
            b = ex.blocks[i]
            x = np.zeros(b.input.shape, b.input.dtype)
            times = [ex.run_timed(i, i + 1, x)[1][0] for _ in range(3)]
            self._block_ms[sha] = float(np.median(times)) * 1e3
        return self._block_ms[sha]

    def _run_query(self, job: _Job) -> None:
        h: Query = job.header
        queue_ms = (time.perf_counter() - job.enqueued) * 1e3
        if queue_ms > h.deadline_ms:  # the device has finished it locally by now: save the work
            self._error(
                h.device,
                "deadline_expired",
                f"waited {queue_ms:.0f} ms in the queue, deadline {h.deadline_ms:g} ms",
                h.request_id,
            )
            return
        a = self.store.model(h.model_id)
        ex = self.executor(h.model_id)
        if a is None or ex is None:
            self._error(
                h.device,
                "unknown_model",
                f"model {h.model_id[:12]}… is not announced",
                h.request_id,
            )
            return
        if not 0 <= h.start < h.end <= len(a.blocks):
            self._error(
                h.device,
                "bad_range",
                f"block range [{h.start}, {h.end}) outside [0, {len(a.blocks)})",
                h.request_id,
            )
            return
        missing = [
            i for i in range(h.start, h.end) if not self.store.has_block(a.blocks[i].onnx_sha256)
        ]
        if missing:
            self._error(
                h.device, "blocks_missing", f"blocks {missing} are not uploaded", h.request_id
            )
            return
        assert job.body is not None
        self.stats.in_flight += 1
        try:
            t0 = time.perf_counter()
            y, times = ex.run_timed(h.start, h.end, tensor_of(h, job.body))
            exec_ms = (time.perf_counter() - t0) * 1e3
        except (RuntimeInputError, BlockRangeError) as e:
            self._error(h.device, "bad_tensor", str(e), h.request_id)
            return
        finally:
            self.stats.in_flight -= 1
        self.stats.queries += 1
        a_ = 0.2
        self.stats.queue_ms_ewma += a_ * (queue_ms - self.stats.queue_ms_ewma)
        self.stats.exec_ms_ewma += a_ * (exec_ms - self.stats.exec_ms_ewma)
        assert self.link is not None
        self.link.publish(
            self.topics.device_inbox(h.device),
            encode_tensor_frame(
                Result,
                y,
                request_id=h.request_id,
                queue_ms=queue_ms,
                exec_ms=exec_ms,
                block_ms=[t * 1e3 for t in times],
            ),
        )
