"""Queries: validated queries queued fairly and within bounds, run by worker threads that
each drive one sandboxed ONNX Runtime process (``WorkerProcess``), and their results (sent,
then counted).

A query goes from paho's network thread (decoded and checked there, ``InboundRouter``)
straight into the ``FairQueue`` (``submit``: never blocks; a full queue is a ``busy`` refusal
with a retry hint), and its ``edge-worker`` thread copies the tensor into its process's shared
buffer, waits for the answer within the run time limit, and sends the result to the device
itself: one thread handoff each way, as with no loop at all. A block that breaks its worker's
limits is reported to the loop (``on_fault``: quarantined there); the query gets a
``quarantined`` error and the worker thread goes on with a fresh process.

The loop owns the counters (``EdgeStats``): results sent wait in a thread-safe queue until the
loop next reads them (``count``); failures are posted at once, to be answered. How many
queries are outstanding is a ``_Gauge`` of its own, so admission needs no hop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edge_agent.fair import FairQueue, QueueLimits
from edge_agent.payoff import BatchPayoff
from edge_agent.replies import Replies
from edge_agent.stats import EdgeStats
from edge_agent.threads import EdgeThreads
from edge_agent.workers import (
    START_TIMEOUT_S,
    BlockFaultError,
    BlockRunError,
    Chain,
    PixelInput,
    RunTimeoutError,
    WorkerInput,
    WorkerProcess,
    input_nbytes,
)
from iotoffload.transport.frame import (
    ErrorCode,
    ProtocolError,
    Query,
    Result,
    WireTensor,
    encode,
)

log = logging.getLogger(__name__)
EWMA_ALPHA = 0.2
COUNT_EVERY = 256  # results sent and not counted before the workers ask the loop to count
MIN_RETRY_MS = 50.0
STOP_GRACE_S = 5.0  # at stop, a run still going gets this long before its worker is killed


class _WorkerTroubleError(Exception):
    """The worker process failed twice outside any block (its server, the machine)."""


@dataclass(frozen=True)
class WorkerLimits:
    memory_bytes: int = 3072 * 1024 * 1024
    run_s: float = 10.0  # one run
    load_s: float = 60.0  # sessions created (the first run of blocks in a process)
    session_threads: int = 1  # ONNX Runtime intra-op threads
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime, in order


@dataclass(frozen=True)
class BatchLimits:
    """Dynamic batching: a worker that takes a query also takes up to ``max_batch - 1``
    queued ones for the same model and blocks (from any device, in the fair queue's turn),
    waiting up to ``max_delay_ms`` for them to arrive. 0 ms (the default) adds no wait: batches
    form only from queries already queued, that is under load. ``max_batch`` 1: off.
    ``max_bytes`` caps a batch's inputs and outputs together (the worker holds them all in
    its shared buffer at once): large tensors batch fewer at a time."""

    max_batch: int = 8
    max_delay_ms: float = 0.0
    max_bytes: int = 64 << 20
    # a block range keeps batching only while its batches cost at most this share per query
    # of running the queries one by one (as its blocks were judged): a batch makes each of
    # its queries wait for all of them, which a small saving does not pay for
    min_gain: float = 0.9

    def size_for(self, in_bytes: int, out_bytes: int) -> int:
        """How many queries of these tensor sizes one batch may hold (at least 1)."""
        return max(1, min(self.max_batch, self.max_bytes // max(1, in_bytes + out_bytes)))


@dataclass(frozen=True)
class _QueryJob:
    """A validated query waiting for a worker (in the fair queue)."""

    header: Query
    body: memoryview
    arrived: float  # perf_counter() on the network thread
    chain: Chain
    deadline_ms: float  # the query's, cut to the edge's cap

    @property
    def run_key(self) -> tuple[str, int, int]:
        return (self.chain.model_id, self.header.start, self.header.end)

    @property
    def in_bytes(self) -> int:
        """The bytes of block ``start``'s input in the worker (pixels become float32)."""
        return input_nbytes(self.input)

    @property
    def input(self) -> WorkerInput:
        """What the worker gets: the body, or pixels it normalises as it copies them in."""
        p = self.header.pixels
        return self.body if p is None else PixelInput(self.body, self.header.tensor.shape, p)

    def same_run(self, other: _QueryJob) -> bool:
        """Whether ``other`` can run in one batch with this (same chain, blocks, size)."""
        a, b = self.header, other.header
        return (
            a.start == b.start
            and a.end == b.end
            and other.chain is self.chain
            and other.in_bytes == self.in_bytes  # pixels and floats alike: one input each
        )


class _Gauge:
    """How many queries are admitted and not finished: raised by the network threads as they
    queue one, lowered by a worker as it sends the answer, read by the loop for the status.
    A count with its own lock (memory operations only), so neither side waits for the
    loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    @property
    def value(self) -> int:
        return self._value  # one read of an int

    def add(self, n: int) -> None:
        with self._lock:
            self._value += n


class _Countdown:
    """A future that is done once ``n`` workers each called ``tick`` (any thread)."""

    def __init__(self, n: int) -> None:
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._left = n
        if n <= 0:
            self.future.set_result(None)

    def tick(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.future.set_result(None)


class _Worker:
    """One worker thread and the process it drives; ``control`` takes sessions to create
    ahead of queries (a block just uploaded)."""

    def __init__(self, index: int, limits: WorkerLimits) -> None:
        self.index = index
        self.proc = WorkerProcess(
            f"edge-worker-{index}",
            memory_bytes=limits.memory_bytes,
            threads=limits.session_threads,
            providers=limits.providers,
        )
        # (chain, blocks, done): ``done`` is set once the sessions exist or could not be made
        self.control: queue.SimpleQueue[tuple[Chain, list[int], _Countdown]] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.warned: tuple[str, ...] | None = None  # the providers last warned about
        self.asked: int | None = None  # the process last asked for its providers


class QueryQueue:
    """The counters are owned by the edge's loop (``open`` and ``close`` from the edge's
    start and stop); ``submit`` and the worker threads run on other threads and only post or
    put."""

    def __init__(
        self,
        workers: int,
        stats: EdgeStats,
        replies: Replies,
        threads: EdgeThreads,
        *,
        ran: Callable[[str, Iterable[int]], None],
        limits: QueueLimits | None = None,
        worker_limits: WorkerLimits | None = None,
        max_deadline_ms: float = 30_000.0,
        quarantined: Callable[[str], str | None] = lambda sha: None,
        any_quarantined: Callable[[], int] = lambda: 0,
        on_fault: Callable[[Chain, BlockFaultError], None] = lambda c, f: None,
        observe: Callable[[float, float, int], None] = lambda queue_ms, exec_ms, batch: None,
        batching: BatchLimits | None = None,
        on_providers: Callable[[str, tuple[str, ...]], None] | None = None,
    ) -> None:
        self.workers = workers
        # on the loop: a worker's sessions were made on these providers
        self._on_providers = on_providers or stats.used_providers
        self.batching = batching or BatchLimits()
        # on the worker threads: (queue ms, exec ms, batch size) of each result
        self._observe = observe
        self._stats = stats
        self._replies = replies
        self._threads = threads
        self._ran = ran  # (model id, blocks): their sessions exist now
        self._limits = limits or QueueLimits()
        self._worker_limits = worker_limits or WorkerLimits()
        self._max_deadline_ms = max_deadline_ms
        self._quarantined = quarantined  # sha256 -> why, when quarantined (any thread)
        self._any_quarantined = any_quarantined  # how many are (any thread)
        self._on_fault = on_fault  # on the loop: a block broke its limits
        self._outstanding = _Gauge()  # admitted, not finished: waiting or running
        self._fair: FairQueue[_QueryJob] = FairQueue(self._limits)
        # queries per run lately: written by the worker threads (one float store), read for
        # the load factor and the retry hint
        self._batch_ewma = 1.0
        # models whose batch failed once (so a block that hangs or breaks only when batched
        # costs one time limit, not one per batch) and block ranges whose batches did not pay
        # (``BatchLimits.min_gain``): they run one query at a time from then on (added by the
        # worker threads; a set's add and membership test are atomic)
        self._unbatched: set[object] = set()
        self._payoff = BatchPayoff(self.batching.min_gain)
        self._workers: list[_Worker] = []
        self._closing = False
        # results sent, not counted yet: (query, queue ms, exec ms), put by the workers
        self._done: queue.SimpleQueue[tuple[Query, float, float]] = queue.SimpleQueue()

    @property
    def queued(self) -> int:
        """Queries waiting for a worker (any thread)."""
        return max(0, self._outstanding.value - self.workers)

    @property
    def in_flight(self) -> int:
        """Queries running on a worker (any thread)."""
        return min(self._outstanding.value, self.workers)

    def worker_pids(self) -> list[int]:
        """The worker processes running now (any thread; for tests and operators)."""
        return [p for w in self._workers if (p := w.proc.pid) is not None]

    @property
    def restarts(self) -> int:
        return sum(w.proc.restarts for w in self._workers)

    # lifecycle (the edge's owner) ---------------------------------------------------------
    def open(self) -> None:
        """(Re)start: nothing is outstanding; the worker threads start (their processes on
        first use)."""
        self._outstanding = _Gauge()
        self._closing = False
        self._fair = FairQueue(self._limits)
        self._workers = [_Worker(i, self._worker_limits) for i in range(self.workers)]
        for w in self._workers:
            w.thread = threading.Thread(
                target=self._serve, args=(w,), name=f"edge-worker_{w.index}", daemon=True
            )
            w.thread.start()

    def close(self) -> None:
        """Take no more; queued queries are dropped (their devices see the edge go offline);
        running ones finish; join the threads and stop their processes."""
        self._closing = True
        left = self._fair.close()
        self._outstanding.add(-len(left))
        for w in self._workers:
            if w.thread is not None:
                w.thread.join(STOP_GRACE_S)
                if w.thread.is_alive() and (pid := w.proc.pid) is not None:
                    # a run still going at stop: ended (and blamed on nothing: closing)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                w.thread.join()
            w.proc.close()
        self._workers = []

    @property
    def batch_ewma(self) -> float:
        """Queries per run lately (1 without batching; any thread: one float read)."""
        return self._batch_ewma

    def load_factor(self) -> float:
        """Coarse load for discovery: queued plus running queries per worker, counted in
        runs: a worker that lately ran batches of k serves k of them at once."""
        return self._outstanding.value / (self.workers * max(1.0, self._batch_ewma))

    async def drain(self, timeout: float) -> None:
        """Let queued and running queries finish (at most ``timeout`` s)."""
        end = time.monotonic() + timeout
        while self._outstanding.value and time.monotonic() < end:
            await asyncio.sleep(0.01)

    # admission (any thread) ---------------------------------------------------------------
    def retry_ms(self) -> float:
        """When a refused query might find room: the queue ahead of it at the recent
        execution time."""
        per = max(self._stats.exec_ms_ewma, 1.0)  # a float read: no hop (a run's time)
        runs = len(self._fair) / max(1.0, self._batch_ewma) + self.workers
        return max(MIN_RETRY_MS, per * runs / self.workers)

    def submit(self, h: Query, body: memoryview, arrived: float, chain: Chain) -> None:
        """A validated query (any thread): into the fair queue, run as soon as a worker is
        free; a full queue answers ``busy`` (posted to the loop, which counts it)."""
        job = _QueryJob(h, body, arrived, chain, min(h.deadline_ms, self._max_deadline_ms))
        gauge = self._outstanding
        gauge.add(1)
        refused = self._fair.put(h.device, job, len(body))
        if refused is None:
            return
        gauge.add(-1)
        if self._closing:
            return
        err = ProtocolError(
            ErrorCode.BUSY,
            f"the edge is busy: {refused}",
            request_id=h.request_id,
            device=h.device,
            retry_ms=round(self.retry_ms(), 1),
        )
        self._threads.post(self._replies.error, err)

    def warm(self, chain: Chain, indices: list[int]) -> concurrent.futures.Future[None]:
        """Create these blocks' sessions in every worker process ahead of queries (on the
        loop, after the loader's probe passed them); done once every worker has them (or
        failed to make them, or closed): a query sent after it pays no session creation."""
        done = _Countdown(len(self._workers))
        for w in self._workers:
            w.control.put((chain, indices, done))
        self._fair.poke()
        return done.future

    # the worker threads -------------------------------------------------------------------
    def _serve(self, w: _Worker) -> None:
        try:
            w.proc.prestart()  # ready before the first query needs it
        except (BlockFaultError, OSError) as f:
            log.warning("%s: %s (started again on first use)", w.proc.name, f)
        while True:
            job = self._fair.get(wake=lambda: not w.control.empty())
            try:
                self._warm(w)
            except Exception:  # the thread must outlive anything: queries wait on it
                log.exception("%s: warming sessions failed", w.proc.name)
            if job is not None:
                jobs = [job]
                try:
                    jobs += self._batch_for(job)
                except Exception:  # the thread must outlive anything: run what it has
                    log.exception("%s: forming a batch failed", w.proc.name)
                if len(jobs) == 1:
                    self._run(w, job)  # answers every job, whatever happens
                else:
                    self._run_batch(w, jobs)  # as do these
                try:  # after the answers: once per process
                    self._ask_providers(w)
                except Exception:  # the thread must outlive anything
                    log.exception("%s: asking its sessions' providers failed", w.proc.name)
            elif self._closing:
                self._warm(w)  # a warm-up put while closing is answered too
                return

    def _batch_for(self, job: _QueryJob) -> list[_QueryJob]:
        """Queued queries to run in one batch with ``job`` (none when batching is off, its
        model or range runs one by one, or its tensors fill a batch alone)."""
        b = self.batching
        out_bytes = job.chain.files[job.header.end - 1].output.nbytes
        n = b.size_for(job.in_bytes, out_bytes)
        u = self._unbatched
        if n < 2 or job.chain.model_id in u or job.run_key in u:
            return []
        return self._fair.take_matching(job.same_run, n - 1, b.max_delay_ms / 1e3)

    def _warm(self, w: _Worker) -> None:
        while True:
            try:
                chain, indices, done = w.control.get_nowait()
            except queue.Empty:
                return
            try:
                if not self._closing:
                    w.proc.load(chain, indices, profile=False, timeout=self._worker_limits.load_s)
                    self._providers(w)
            except (BlockFaultError, BlockRunError, RunTimeoutError) as e:
                # the probe passed it alone: here other models' sessions share the process,
                # so nothing is blamed; a query's run decides (in a fresh process)
                log.warning("%s: sessions of %s… not created: %s", w.proc.name, chain.model_id, e)
            finally:
                done.tick()

    def _providers(self, w: _Worker) -> None:
        """(Its thread.) The worker's sessions' providers, to the loop's stats; a configured
        provider ONNX Runtime did not register for them is said once per worker and set."""
        used = w.proc.providers_in_use
        missing = [p for p in self._worker_limits.providers if p not in used]
        if missing and w.warned != used:
            w.warned = used
            log.warning(
                "%s: ONNX Runtime runs its sessions on %s, not on the configured %s",
                w.proc.name,
                ", ".join(used) or "nothing",
                ", ".join(missing),
            )
        self._threads.post(self._on_providers, w.proc.name, used)

    def _ask_providers(self, w: _Worker) -> None:
        """(Its thread, after a run.) A process whose sessions were made by queries (an edge
        restarted on a full store, a worker restarted after a fault) has not said what they
        run on: asked once per process."""
        pid = w.proc.pid
        if w.proc.providers_in_use or pid is None or pid == w.asked or not w.proc.has_chains:
            return
        w.asked = pid  # once per process, whatever it answers
        try:
            w.proc.ask_providers(START_TIMEOUT_S)
        except (BlockFaultError, BlockRunError, RunTimeoutError) as e:
            log.warning("%s: its sessions' providers not known: %s", w.proc.name, e)
            return
        if w.proc.providers_in_use:
            self._providers(w)

    def _refuse(self, job: _QueryJob, code: ErrorCode, message: str) -> None:
        h = job.header
        e = ProtocolError(code, message, request_id=h.request_id, device=h.device)
        self._threads.post(self._replies.error, e)

    def _admit(self, job: _QueryJob, queue_ms: float) -> bool:
        """Whether the query is still to run; else refused: it waited past its deadline (the
        device has finished it locally: the work is saved) or one of its blocks was
        quarantined while it waited."""
        h = job.header
        if queue_ms > job.deadline_ms:
            msg = f"waited {queue_ms:.0f} ms in the queue, deadline {job.deadline_ms:g} ms"
            self._refuse(job, ErrorCode.DEADLINE_EXPIRED, msg)
            return False
        if self._any_quarantined():
            for i in range(h.start, h.end):
                why = self._quarantined(job.chain.digests[i])
                if why is not None:
                    self._refuse(job, ErrorCode.QUARANTINED, f"block {i} is quarantined: {why}")
                    return False
        return True

    def _answer(
        self,
        job: _QueryJob,
        out: memoryview,
        times: list[float],
        queue_ms: float,
        exec_ms: float,
        batch: int,
    ) -> None:
        """Send the query's Result and count it."""
        h = job.header
        spec = job.chain.files[h.end - 1].output
        header = Result(
            request_id=h.request_id,
            tensor=WireTensor(dtype=spec.dtype, shape=spec.shape),
            queue_ms=queue_ms,
            exec_ms=exec_ms,
            block_ms=[t * 1e3 for t in times],
            batch=batch,
        )
        try:
            frame = encode(header, out)
        finally:
            out.release()  # a view of the worker's buffer: held, it would block its growth
        self._replies.publish(h.device, frame)
        self._done.put((h, queue_ms, exec_ms))
        self._observe(queue_ms, exec_ms, batch)
        if self._done.qsize() >= COUNT_EVERY:  # bounded, however rarely the loop reads
            self._threads.post(self.count)

    def _run(self, w: _Worker, job: _QueryJob) -> BlockFaultError | None:
        """Run a query's blocks in the worker's process and send its Result (or refuse it:
        ``_admit``); the fault reported when a block broke its worker."""
        h = job.header
        try:
            queue_ms = (time.perf_counter() - job.arrived) * 1e3
            if not self._admit(job, queue_ms):
                return None
            lim = self._worker_limits
            # each block gets run_s of its own (its sessions made on first use included);
            # the whole run at most twice the longer of run_s and the query's deadline
            total = 2 * max(lim.run_s, job.deadline_ms / 1e3)
            t0 = time.perf_counter()
            try:
                out, times = self._attempt(w, job, total)
            except BlockFaultError as f:
                if self._closing:  # killed at stop: nothing to blame
                    self._refuse(job, ErrorCode.INTERNAL, "the edge is stopping")
                    return None
                self._threads.post(self._on_fault, job.chain, f)
                where = "" if f.block is None else f"block {f.block} "
                self._refuse(job, ErrorCode.QUARANTINED, f"{where}broke its worker: {f}")
                return f
            except RunTimeoutError as e:
                self._refuse(job, ErrorCode.DEADLINE_EXPIRED, str(e))
                return None
            except _WorkerTroubleError as e:
                self._refuse(job, ErrorCode.INTERNAL, str(e))
                return None
            except BlockRunError as e:
                self._refuse(job, ErrorCode.BAD_TENSOR, str(e))
                return None
            exec_ms = (time.perf_counter() - t0) * 1e3
            self._payoff.single(job.run_key, exec_ms)  # before the answer: nothing after
            self._batch_ewma += EWMA_ALPHA * (1.0 - self._batch_ewma)  # it may refuse
            self._answer(job, out, times, queue_ms, exec_ms, 1)
        except Exception as e:  # a bug here must not end the worker thread
            log.exception("query %s failed", h.request_id)
            self._refuse(job, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            self._outstanding.add(-1)
        return None

    def _run_batch(self, w: _Worker, jobs: list[_QueryJob]) -> None:
        """Run queries of the same blocks as one batch and answer each. A batch that fails
        in any way (a block's fault, a tensor refused, a time limit: with k queries a block
        takes about k times as long) blames nothing: its queries run again one by one, so
        that a fault or a bad tensor is the one query's, and the others are answered. Once
        a block broke its worker alone, the rest are refused without running it again."""
        now = time.perf_counter()
        ready: list[tuple[_QueryJob, float]] = []
        for job in jobs:
            queue_ms = (now - job.arrived) * 1e3
            try:
                ok = self._admit(job, queue_ms)
            except Exception as e:
                log.exception("query %s failed", job.header.request_id)
                self._refuse(job, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
                ok = False
            if ok:
                ready.append((job, queue_ms))
            else:
                self._outstanding.add(-1)
        if len(ready) < 2:
            for job, _ in ready:
                self._run(w, job)
            return
        first = ready[0][0]
        h = first.header
        lim = self._worker_limits
        total = 2 * max(lim.run_s, min(j.deadline_ms for j, _ in ready) / 1e3)
        t0 = time.perf_counter()
        try:
            outs, times, gain = w.proc.run_batch(
                first.chain,
                h.start,
                h.end,
                [j.input for j, _ in ready],
                timeout=lim.run_s,
                total=total,
            )
            if len(outs) != len(ready):
                for o in outs:
                    o.release()
                raise _WorkerTroubleError(f"{len(outs)} outputs for {len(ready)} queries")
        except Exception as e:  # any failure, expected or not: the queries run one by one
            if self._closing:
                for job, _ in ready:
                    self._refuse(job, ErrorCode.INTERNAL, "the edge is stopping")
                    self._outstanding.add(-1)
                return
            self._unbatched.add(first.chain.model_id)
            log.warning(
                "%s: a batch of %d queries of %s… failed (%s): they run one by one, and its "
                "queries from now on",
                w.proc.name,
                len(ready),
                first.chain.model_id[:12],
                e,
            )
            fault: BlockFaultError | None = None
            for job, _ in ready:
                if fault is None:
                    fault = self._run(w, job)
                    continue
                where = "" if fault.block is None else f"block {fault.block} "
                self._refuse(job, ErrorCode.QUARANTINED, f"{where}broke its worker: {fault}")
                self._outstanding.add(-1)
            return
        exec_ms = (time.perf_counter() - t0) * 1e3
        self._batch_ewma += EWMA_ALPHA * (len(ready) - self._batch_ewma)
        ratio = self._payoff.batched(first.run_key, len(ready), exec_ms, gain)
        if ratio is not None:
            self._unbatched.add(first.run_key)
            log.info(
                "%s: batches of blocks [%d, %d) of %s… cost %.2fx per query of one by one "
                "(batched at most %.2fx): they run one query at a time from now on",
                w.proc.name,
                h.start,
                h.end,
                first.chain.model_id[:12],
                ratio,
                self.batching.min_gain,
            )
        for (job, queue_ms), out in zip(ready, outs, strict=True):
            try:
                self._answer(job, out, times, queue_ms, exec_ms, len(ready))
            except Exception as e:  # a bug here must not end the worker thread
                log.exception("query %s failed", job.header.request_id)
                self._refuse(job, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
            finally:
                self._outstanding.add(-1)

    def _attempt(self, w: _Worker, job: _QueryJob, total: float) -> tuple[memoryview, list[float]]:
        """Run the query; a worker that died outside any block, or a block that hit the
        memory cap or killed its worker, gets one more try in a fresh process (with this
        chain alone in it: memory other models' sessions took is not this block's doing).
        What fails twice is the block's (BlockFaultError with its index, to quarantine)."""
        h = job.header
        run_s = self._worker_limits.run_s
        try:
            return w.proc.run(job.chain, h.start, h.end, job.input, timeout=run_s, total=total)
        except BlockFaultError as f:
            if f.kind == "time" or self._closing:
                raise  # a block over its own time limit (or the stop): no second try
            log.warning("%s: %s; running %s again in a fresh process", w.proc.name, f, h.request_id)
        w.proc.close()  # fresh, whatever the first failure left
        try:
            return w.proc.run(job.chain, h.start, h.end, job.input, timeout=run_s, total=total)
        except BlockFaultError as f:
            if f.block is None:  # twice outside any block: the edge's trouble, not a block's
                raise _WorkerTroubleError(f"the worker failed twice: {f}") from f
            raise

    # on the loop --------------------------------------------------------------------------
    def count(self) -> None:
        """On the loop: count the results the workers have sent since the last time."""
        s = self._stats
        while True:
            try:
                h, queue_ms, exec_ms = self._done.get_nowait()
            except queue.Empty:
                return
            s.queries += 1
            s.queue_ms_ewma += EWMA_ALPHA * (queue_ms - s.queue_ms_ewma)
            s.exec_ms_ewma += EWMA_ALPHA * (exec_ms - s.exec_ms_ewma)
            self._ran(h.model_id, range(h.start, h.end))
