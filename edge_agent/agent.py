"""The edge agent: stores uploaded blocks, runs block ranges for devices, reports its load.

One owner of state: the agent's loop (``edge-loop``, an ``AgentLoop``). paho's network threads
only post each inbound message to it; decoding, validation and every change of state (stats,
the query queue, executors and their loaded blocks, block profiles, status) happen there.
Blocking work runs on threads of its own and its result comes back to the loop:

- ``edge-store``: the block store's one writer (chunks, blocks, models);
- ``edge-loader``: a completed block is assembled, digest-checked and screened, then its
  sessions are created and it is profiled (a query never waits behind a 100 MB block);
- ``edge-worker_N`` (``config.workers``): ONNX Runtime runs of queries;
- ``edge-zeroconf``: advertisement updates; ``edge-peer-connect`` / ``edge-peer-push``:
  edge-to-edge transfer (``peers.py``).

``start`` starts all of them and ``stop`` joins all of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from edge_agent.config import EdgeConfig
from edge_agent.peers import PeerTransfers
from edge_agent.screen import screen_onnx
from edge_agent.store import BlockStore, StoreError
from iotoffload import __version__
from iotoffload.discovery import EdgeAdvertiser
from iotoffload.loop import AgentLoop, LoopClosedError
from iotoffload.runtime.base import BlockFile, BlockRangeError, RuntimeInputError
from iotoffload.runtime.onnx import OnnxExecutor
from iotoffload.transport.frame import (
    Announce,
    Error,
    ErrorCode,
    FrameError,
    Header,
    Hello,
    Inventory,
    PeerFetch,
    ProtocolError,
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
from iotoffload.transport.link import Message
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.status import EdgeLoad, EdgeStatus, TransferCounts
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)
T = TypeVar("T")
EWMA_ALPHA = 0.2
STOP_DRAIN_S = 10.0  # at stop, queued and running queries get this long to finish


@dataclass
class EdgeStats:
    """An edge's counters. Owned by the edge loop: changed only there (workers post their
    results back), so no update is lost; ``EdgeAgent.stats`` hands out copies."""

    queries: int = 0
    errors: int = 0
    chunks: int = 0
    blocks_stored: int = 0
    blocks_from_peers: int = 0
    queue_ms_ewma: float = 0.0
    exec_ms_ewma: float = 0.0
    in_flight: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)

    def copy(self) -> EdgeStats:
        return replace(self, error_codes=dict(self.error_codes))


@dataclass(frozen=True)
class _QueryJob:
    """A validated query waiting for a worker (in the loop's queue)."""

    header: Query
    body: memoryview
    arrived: float  # perf_counter() on the network thread
    executor: OnnxExecutor


def _device_of(h: Header) -> str | None:
    d = getattr(h, "device", None)
    return d if isinstance(d, str) else None


def _run_query(job: _QueryJob, queue_ms: float) -> tuple[bytes, float]:
    """On a worker: run the query's blocks and encode its Result (the frame, exec ms)."""
    h = job.header
    try:
        t0 = time.perf_counter()
        y, times = job.executor.run_timed(h.start, h.end, tensor_of(h, job.body))
        exec_ms = (time.perf_counter() - t0) * 1e3
    except (RuntimeInputError, BlockRangeError) as e:
        raise ProtocolError(
            ErrorCode.BAD_TENSOR, str(e), request_id=h.request_id, device=h.device
        ) from e
    frame = encode_tensor_frame(
        Result,
        y,
        request_id=h.request_id,
        queue_ms=queue_ms,
        exec_ms=exec_ms,
        block_ms=[t * 1e3 for t in times],
    )
    return frame, exec_ms


def _load_blocks(ex: OnnxExecutor, indices: list[int], profile: bool) -> float | None:
    """On the loader: create the sessions of a block (at each index it has in the chain) and,
    when asked, its unloaded time (median of 3 runs on zeros), the base of the load factor
    devices compute from every reply (LoADPart)."""
    for i in indices:
        ex.load(i)
    if not profile:
        return None
    i = indices[0]
    b = ex.blocks[i]
    x = np.zeros(b.input.shape, b.input.dtype)
    times = [ex.run_timed(i, i + 1, x)[1][0] for _ in range(3)]
    return float(np.median(times)) * 1e3


class EdgeAgent:
    """One edge. Owned by its loop (``edge-loop``) from ``start`` to ``stop``: every ``_``
    attribute below is touched only there. The public methods may be called from any thread
    (they hop into the loop and wait for its answer); ``start``/``stop`` from the owner's."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.store = BlockStore(
            config.store, max_block_bytes=config.max_block_bytes, screen=screen_onnx
        )
        self._stats = EdgeStats()
        self._executors: dict[str, OnnxExecutor] = {}
        self._loaded: dict[str, set[int]] = {}  # model id -> blocks whose session exists
        self._block_ms: dict[str, float] = {}  # sha256 -> unloaded time, ms
        self._queue: deque[_QueryJob] = deque()  # validated queries waiting for a worker
        self._finishing: dict[str, asyncio.Task[ProtocolError | None]] = {}  # sha256 -> task
        self._announcing: dict[str, asyncio.Future[None]] = {}  # model id -> put_model
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle: asyncio.Event | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._aloop: AgentLoop | None = None
        self._store_pool: ThreadPoolExecutor | None = None
        self._loader_pool: ThreadPoolExecutor | None = None
        self._worker_pool: ThreadPoolExecutor | None = None
        self._zeroconf_pool: ThreadPoolExecutor | None = None
        self.link: MqttLink | None = None
        self.broker_url = config.broker or ""
        self._advertiser: EdgeAdvertiser | None = None
        self.peers = PeerTransfers(
            config.id,
            self.topics,
            own_link=self._link,
            own_broker=lambda: self.broker_url,
            on_upload=self._on_upload_message,
            block_path=self._stored_block,
            reply_error=self._error,
            post=self._post,
            allowed_brokers=config.peer_brokers,
            protocol=config.protocol,
            chunk_bytes=config.transfer_chunk_bytes,
        )

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

    # hopping into the loop ----------------------------------------------------------------
    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (from any thread; dropped when not running)."""
        lp = self._aloop
        if lp is not None:
            lp.post(fn, *args)

    def _call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the loop, its result here. Before ``start`` and after ``stop`` nothing
        else touches the state: ``fn`` runs on the caller's thread."""
        lp = self._aloop
        if lp is not None:
            with contextlib.suppress(LoopClosedError, concurrent.futures.CancelledError):
                return lp.call(fn, timeout=30)
        return fn()

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task on the loop, kept alive until done; an unexpected failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("edge task failed", exc_info=task.exception())

    @staticmethod
    def _submit(
        pool: ThreadPoolExecutor | None, fn: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """``fn(*args)`` on ``pool`` (submitted now: a pool runs its jobs in order), as a
        future of the loop. Cancelled when the edge is stopping."""
        if pool is None:
            raise asyncio.CancelledError
        try:
            return asyncio.wrap_future(pool.submit(fn, *args))
        except RuntimeError as e:  # the pool is shut down: the edge is stopping
            raise asyncio.CancelledError from e

    # lifecycle ----------------------------------------------------------------------------
    def start(self, broker_url: str | None = None) -> None:
        self.broker_url = broker_url or self.config.broker or self.broker_url
        if not self.broker_url:
            raise ValueError("no broker URL")
        if self._aloop is not None:
            raise RuntimeError("the edge is started already")
        with contextlib.suppress(ImportError):  # imported once here, not on the loop
            import onnxruntime  # noqa: F401
        cid = self.config.id
        self._stopping = False
        self._idle = asyncio.Event()  # set while no query is queued or running
        self._idle.set()
        self._aloop = AgentLoop("edge-loop", workers=1)
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="edge-store")
        self._loader_pool = ThreadPoolExecutor(1, thread_name_prefix="edge-loader")
        self._worker_pool = ThreadPoolExecutor(
            self.config.workers, thread_name_prefix="edge-worker"
        )
        self._zeroconf_pool = ThreadPoolExecutor(1, thread_name_prefix="edge-zeroconf")
        self.peers.open()
        try:
            will = self._call(lambda: self._status_json("offline"))
            self.link = MqttLink(
                self.broker_url,
                f"edge-{cid}",
                protocol=self.config.protocol,
                will=(self.topics.edge_status(cid), will, True),
            )
            self.link.subscribe(self.topics.edge_control(cid), self._on_control_message)
            self.link.subscribe(self.topics.edge_upload(cid), self._on_upload_message)
            self.link.subscribe(self.topics.edge_query(cid), self._on_query_message)
            # a restarted broker lost the retained status (a hook on the network thread)
            self.link.on_reconnect.append(lambda: self._post(self._publish_status))
            self.link.connect()
            self._aloop.run(self._begin(), timeout=30)
            if self.config.advertise:
                advertiser = EdgeAdvertiser(cid, self.broker_url, self.config.interface)
                advertiser.register(self.load_factor())
                self._advertiser = advertiser
        except BaseException:
            self.stop()
            raise
        log.info("edge %s online at %s, store %s", cid, self.broker_url, self.config.store)

    async def _begin(self) -> None:
        self._publish_status()
        self._status_task = self._spawn(self._status_loop())

    def load_factor(self) -> float:
        """Coarse load for discovery: queued plus running queries per worker."""
        return self._call(self._load_factor)

    def _load_factor(self) -> float:
        return (len(self._queue) + self._stats.in_flight) / self.config.workers

    def stop(self) -> None:
        """Publish offline, finish what runs, join every thread ``start`` started."""
        lp = self._aloop
        if lp is None:
            return
        try:
            lp.run(self._quiesce(), timeout=STOP_DRAIN_S + 5)
        except (TimeoutError, LoopClosedError, concurrent.futures.CancelledError):
            log.warning("edge %s: the loop did not quiesce", self.config.id)
        if self._zeroconf_pool is not None:
            self._zeroconf_pool.shutdown(wait=True, cancel_futures=True)
        if self._advertiser:
            self._advertiser.close()
            self._advertiser = None
        for pool in (self._worker_pool, self._store_pool, self._loader_pool):
            if pool is not None:  # running jobs finish (and post back); queued ones are dropped
                pool.shutdown(wait=True, cancel_futures=True)
        links: list[MqttLink] = []
        try:
            links = lp.run(self.peers.drain(), timeout=self.peers.connect_timeout + 5)
        except (TimeoutError, LoopClosedError, concurrent.futures.CancelledError):
            log.warning("edge %s: peer transfers did not drain", self.config.id)
        self.peers.close(links)
        if self.link:
            if self.link.connected:
                offline = self._call(lambda: self._status_json("offline"))
                info = self.link.publish(
                    self.topics.edge_status(self.config.id), offline, retain=True
                )
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(2)
            self.link.close()
        lp.close()
        self._aloop = None
        self._store_pool = self._loader_pool = self._worker_pool = self._zeroconf_pool = None

    async def _quiesce(self) -> None:
        """On the loop: take no more messages, stop the status task, let queued and running
        queries finish (bounded)."""
        self._stopping = True
        if self._status_task is not None:
            self._status_task.cancel()
            await asyncio.gather(self._status_task, return_exceptions=True)
            self._status_task = None
        if self._idle is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), STOP_DRAIN_S)

    # status (on the loop) -----------------------------------------------------------------
    def _status_json(self, state: Literal["online", "offline"]) -> bytes:
        s = self._stats
        return EdgeStatus(
            state=state,
            edge=self.config.id,
            version=__version__,
            broker=self.broker_url,
            protocol=self.config.protocol,
            load=EdgeLoad(
                queue=len(self._queue),
                in_flight=s.in_flight,
                queue_ms=round(s.queue_ms_ewma, 3),
                exec_ms=round(s.exec_ms_ewma, 3),
            ),
            models=self.store.model_ids(),
            blocks=len(self.store.block_digests()),
            transfer=TransferCounts(
                blocks_pushed=self.peers.blocks_pushed, blocks_from_peers=s.blocks_from_peers
            ),
            time=time.time(),
        ).to_json()

    def publish_status(self) -> None:
        self._call(self._publish_status)

    def _publish_status(self) -> None:
        if self.link and self.link.connected and not self._stopping:
            self.link.publish(
                self.topics.edge_status(self.config.id), self._status_json("online"), retain=True
            )

    async def _status_loop(self) -> None:
        advertised = 0.0
        served = self._stats.queries
        while True:
            await asyncio.sleep(self.config.status_interval)
            s = self._stats
            if s.queries == served and not self._queue:
                # idle since the last status: the queueing estimate fades out
                s.queue_ms_ewma *= 0.5
                s.exec_ms_ewma *= 0.5
            served = s.queries
            self._publish_status()
            load = self._load_factor()
            adv = self._advertiser
            if adv is not None and abs(load - advertised) >= 0.5:  # TXT updates are multicast
                advertised = load
                await self._submit(self._zeroconf_pool, adv.update, load)

    # helpers (on the loop) ----------------------------------------------------------------
    def _reply(self, device: str, header: Inventory | UploadAck | Error) -> None:
        if self.link is not None:
            self.link.publish(self.topics.device_inbox(device), encode(header))

    def _error(self, e: ProtocolError) -> None:
        """Count a refusal and answer it with an error frame (when it names a device)."""
        code = e.code.value
        self._stats.errors += 1
        self._stats.error_codes[code] = self._stats.error_codes.get(code, 0) + 1
        log.warning("error %s for %s: %s", code, e.device or "?", e)
        if e.device:
            self._reply(e.device, Error.of(e, edge=self.config.id))

    def _chunk_error(self, h: UploadChunk, code: ErrorCode, message: str) -> None:
        self._error(ProtocolError(code, message, device=h.device, block=h.block, chunk=h.chunk))

    def _unexpected(self, h: Header, topic: str) -> None:
        msg = f"{h.type} on the {topic} topic"
        self._error(ProtocolError(ErrorCode.UNEXPECTED, msg, device=_device_of(h)))

    def executor(self, model_id: str) -> OnnxExecutor | None:
        return self._call(lambda: self._executor(model_id))

    def _executor(self, model_id: str) -> OnnxExecutor | None:
        ex = self._executors.get(model_id)
        if ex is None:
            a = self.store.model(model_id)
            if a is None:
                return None
            files = [
                BlockFile(self.store.block_path(b.onnx_sha256), b.input, b.output) for b in a.blocks
            ]
            ex = OnnxExecutor(files, threads=self.config.threads)  # sessions come later
            self._executors[model_id] = ex
        return ex

    def inventory(self, model_id: str) -> Inventory:
        return self._call(lambda: self._inventory(model_id))

    def _inventory(self, model_id: str) -> Inventory:
        a = self.store.model(model_id)
        if a is None:
            return Inventory(model_id=model_id, known=False, edge=self.config.id)
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
            loaded=sorted(self._loaded.get(model_id, ())),
            partial=partial,
            block_ms=block_ms,
            edge=self.config.id,
        )

    @property
    def stats(self) -> EdgeStats:
        """A copy of the counters, taken on the loop."""
        return self._call(self._stats.copy)

    # network threads: hand the message to the loop, nothing else --------------------------
    def _on_control_message(self, m: Message) -> None:
        self._post(self._control, m.payload)

    def _on_upload_message(self, m: Message) -> None:
        self._post(self._upload, m.payload)

    def _on_query_message(self, m: Message) -> None:
        self._post(self._query, m.payload, time.perf_counter())

    # inbound messages (on the loop) -------------------------------------------------------
    def _decode(self, payload: bytes) -> tuple[Header, memoryview] | None:
        try:
            return decode(payload, max_body=self.config.max_block_bytes)
        except FrameError as e:
            self._error(e)
            return None

    def _control(self, payload: bytes) -> None:
        if self._stopping or (d := self._decode(payload)) is None:
            return
        h = d[0]
        if isinstance(h, Announce):
            fut = self._submit(self._store_pool, self.store.put_model, h)
            self._announcing[h.model_id] = fut
            self._spawn(self._announced(h, fut))
        elif isinstance(h, Hello):
            self._after_announce(h.model_id, functools.partial(self._hello, h))
        elif isinstance(h, Transfer):
            self._after_announce(h.model_id, functools.partial(self._transfer, h))
        elif isinstance(h, PeerFetch):
            self.peers.push(h)
        else:
            self._unexpected(h, "control")

    async def _announced(self, h: Announce, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except StoreError as e:
            self._error(ProtocolError(e.code, str(e), device=h.device))
            return
        except OSError as e:
            self._error(ProtocolError(ErrorCode.STORE_FAILED, str(e), device=h.device))
            return
        finally:
            if self._announcing.get(h.model_id) is fut:
                del self._announcing[h.model_id]
        self._reply(h.device, self._inventory(h.model_id))
        self._publish_status()

    def _after_announce(self, model_id: str, fn: Callable[[], None]) -> None:
        """``fn()`` now, or once an Announce of that model being stored is done (a Hello or
        Transfer sent right after it sees the model)."""
        pending = self._announcing.get(model_id)
        if pending is None:
            fn()
            return

        async def later() -> None:
            with contextlib.suppress(Exception):  # answered by _announced
                await asyncio.shield(pending)
            fn()

        self._spawn(later())

    def _hello(self, h: Hello) -> None:
        self._reply(h.device, self._inventory(h.model_id))

    def _transfer(self, h: Transfer) -> None:
        if self.store.model(h.model_id) is None:
            self._error(
                ProtocolError(
                    ErrorCode.UNKNOWN_MODEL,
                    "announce the model before a transfer",
                    device=h.device,
                )
            )
            return
        self.peers.pull(h)

    def _upload(self, payload: bytes) -> None:
        if self._stopping or (d := self._decode(payload)) is None:
            return
        h, body = d
        if not isinstance(h, UploadChunk):
            self._unexpected(h, "upload")
            return
        self._stats.chunks += 1
        put = functools.partial(self.store.put_chunk, finish=False)
        self._spawn(self._chunk_stored(h, self._submit(self._store_pool, put, h, body)))

    async def _chunk_stored(self, h: UploadChunk, fut: asyncio.Future[bool]) -> None:
        try:
            done = await fut
        except StoreError as e:
            self._chunk_error(h, e.code, str(e))
            return
        except OSError as e:  # the store turns these into STORE_FAILED; kept as a backstop
            self._chunk_error(h, ErrorCode.STORE_FAILED, str(e))
            return
        ack = UploadAck(
            model_id=h.model_id,
            block=h.block,
            chunk=h.chunk,
            block_done=done,
            loaded=False,
            edge=self.config.id,
        )
        if not done:
            self._reply(h.device, ack)
            return
        sha = h.block_sha256
        if not self.store.has_block(sha):
            task = self._finishing.get(sha)
            if task is None:  # one finish per block, however many last chunks arrive
                task = self._spawn(self._finish_block(h))
                self._finishing[sha] = task
            failed = await asyncio.shield(task)
            if failed is not None:
                self._chunk_error(h, failed.code, str(failed))
                return
        try:
            loaded, ms = await self._load(h.model_id, sha)
        except Exception as e:  # the loader lives on; the error names no chunk (mqtt-api.md)
            log.exception("loading block %d of %s… failed", h.block, h.model_id[:12])
            msg = f"block {h.block}: {type(e).__name__}: {e}"
            self._error(ProtocolError(ErrorCode.INTERNAL, msg, device=h.device))
            return
        self._reply(h.device, ack.model_copy(update={"loaded": loaded, "block_ms": ms}))
        self._publish_status()

    async def _finish_block(self, h: UploadChunk) -> ProtocolError | None:
        """Assemble, check and screen on the loader; store on the store thread; the partial
        upload goes only once the block is written, or once it can never complete."""
        sha = h.block_sha256
        try:
            try:
                blob = await self._submit(self._loader_pool, self.store.check_block, h)
            except StoreError as e:
                if e.definitive:
                    await self._submit(self._store_pool, self.store.discard_partial, h)
                return e
            try:
                fresh = await self._submit(self._store_pool, self.store.commit_block, h, blob)
            except StoreError as e:
                return e
        except OSError as e:
            return ProtocolError(ErrorCode.STORE_FAILED, f"block {h.block}: {e}")
        finally:
            self._finishing.pop(sha, None)
        if fresh:  # counted once per block
            self._stats.blocks_stored += 1
            if h.source:
                self._stats.blocks_from_peers += 1
        return None

    async def _load(self, model_id: str, sha: str) -> tuple[bool, float | None]:
        """Sessions for a stored block in a model's executor (on the loader); (loaded,
        the block's unloaded ms)."""
        a = self.store.model(model_id)
        ex = self._executor(model_id)
        if a is None or ex is None:
            return False, None
        indices = [i for i, b in enumerate(a.blocks) if b.onnx_sha256 == sha]
        if not indices:
            return False, None
        profile = sha not in self._block_ms
        ms = await self._submit(self._loader_pool, _load_blocks, ex, indices, profile)
        if ms is not None:
            self._block_ms.setdefault(sha, ms)
        self._loaded.setdefault(model_id, set()).update(indices)
        return True, self._block_ms.get(sha)

    def _query(self, payload: bytes, arrived: float) -> None:
        if self._stopping or (d := self._decode(payload)) is None:
            return
        h, body = d
        if not isinstance(h, Query):
            self._unexpected(h, "query")
            return
        a = self.store.model(h.model_id)
        ex = self._executor(h.model_id)

        def refuse(code: ErrorCode, message: str) -> None:
            self._error(ProtocolError(code, message, request_id=h.request_id, device=h.device))

        if a is None or ex is None:
            refuse(ErrorCode.UNKNOWN_MODEL, f"model {h.model_id[:12]}… is not announced")
            return
        if not 0 <= h.start < h.end <= len(a.blocks):
            refuse(
                ErrorCode.BAD_RANGE,
                f"block range [{h.start}, {h.end}) outside [0, {len(a.blocks)})",
            )
            return
        missing = [
            i for i in range(h.start, h.end) if not self.store.has_block(a.blocks[i].onnx_sha256)
        ]
        if missing:
            refuse(ErrorCode.BLOCKS_MISSING, f"blocks {missing} are not uploaded")
            return
        self._queue.append(_QueryJob(h, body, arrived, ex))
        self._pump()

    def _pump(self) -> None:
        """Hand queued queries to free workers (``in_flight`` counts the running ones)."""
        assert self._idle is not None
        while self._queue and self._stats.in_flight < self.config.workers:
            job = self._queue.popleft()
            h = job.header
            queue_ms = (time.perf_counter() - job.arrived) * 1e3
            if queue_ms > h.deadline_ms:  # the device has finished it locally: save the work
                self._error(
                    ProtocolError(
                        ErrorCode.DEADLINE_EXPIRED,
                        f"waited {queue_ms:.0f} ms in the queue, deadline {h.deadline_ms:g} ms",
                        request_id=h.request_id,
                        device=h.device,
                    )
                )
                continue
            if self._worker_pool is None:
                break
            try:
                fut = self._worker_pool.submit(_run_query, job, queue_ms)
            except RuntimeError:  # shut down: the edge is stopping
                break
            self._stats.in_flight += 1
            fut.add_done_callback(functools.partial(self._post, self._query_done, job, queue_ms))
        if self._queue or self._stats.in_flight:
            self._idle.clear()
        else:
            self._idle.set()

    def _query_done(
        self, job: _QueryJob, queue_ms: float, fut: concurrent.futures.Future[tuple[bytes, float]]
    ) -> None:
        """A worker's result, back on the loop: count it, then answer."""
        self._stats.in_flight -= 1
        h = job.header
        try:
            frame, exec_ms = fut.result()
        except concurrent.futures.CancelledError:
            pass
        except ProtocolError as e:
            self._error(e)
        except Exception as e:  # a job that raised: the worker lives on
            log.exception("query %s failed", h.request_id)
            self._error(
                ProtocolError(
                    ErrorCode.INTERNAL,
                    f"{type(e).__name__}: {e}",
                    request_id=h.request_id,
                    device=h.device,
                )
            )
        else:
            s = self._stats
            s.queries += 1
            s.queue_ms_ewma += EWMA_ALPHA * (queue_ms - s.queue_ms_ewma)
            s.exec_ms_ewma += EWMA_ALPHA * (exec_ms - s.exec_ms_ewma)
            self._loaded.setdefault(h.model_id, set()).update(range(h.start, h.end))
            if self.link is not None:
                self.link.publish(self.topics.device_inbox(h.device), frame)
        self._pump()
