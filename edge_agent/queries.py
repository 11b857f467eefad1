"""Queries: validated queries handed to the workers that run them on ONNX Runtime, and their
results (sent, then counted).

A query goes from paho's network thread (decoded and checked there, ``InboundRouter``) straight
into the worker pool's queue (``submit``, thread-safe), and its ``edge-worker`` thread sends
the result to the device itself: one thread handoff each way, as with no loop at all. The
loop owns the counters (``EdgeStats``): results sent wait in a thread-safe queue until the
loop next reads them (``count``); failures are posted at once, to be answered. How many
queries are outstanding is a ``_Gauge`` of its own, so admission needs no hop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edge_agent.replies import Replies
from edge_agent.stats import EdgeStats
from edge_agent.threads import EdgeThreads
from iotoffload.runtime.base import BlockRangeError, RuntimeInputError
from iotoffload.runtime.onnx import OnnxExecutor
from iotoffload.transport.frame import (
    ErrorCode,
    ProtocolError,
    Query,
    Result,
    encode_tensor_frame,
    tensor_of,
)

log = logging.getLogger(__name__)
EWMA_ALPHA = 0.2
COUNT_EVERY = 256  # results sent and not counted before the workers ask the loop to count


@dataclass(frozen=True)
class _QueryJob:
    """A validated query waiting for a worker (in the loop's queue)."""

    header: Query
    body: memoryview
    arrived: float  # perf_counter() on the network thread
    executor: OnnxExecutor


def _run_query(job: _QueryJob) -> tuple[bytes, float, float]:
    """On a worker: run the query's blocks and encode its Result (the frame, queue ms, exec
    ms); a query that waited past its deadline is refused instead (the device has finished it
    locally: the work is saved)."""
    h = job.header
    queue_ms = (time.perf_counter() - job.arrived) * 1e3
    if queue_ms > h.deadline_ms:
        raise ProtocolError(
            ErrorCode.DEADLINE_EXPIRED,
            f"waited {queue_ms:.0f} ms in the queue, deadline {h.deadline_ms:g} ms",
            request_id=h.request_id,
            device=h.device,
        )
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
    return frame, queue_ms, exec_ms


class _Gauge:
    """How many queries are admitted and not finished: raised by the network threads as they
    hand one to the workers, lowered by a worker as it sends the answer, read by the loop for
    the status. A count with its own lock (memory operations only), so neither side waits
    for the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    @property
    def value(self) -> int:
        return self._value  # one read of an int

    def add(self, n: int) -> None:
        with self._lock:
            self._value += n


class QueryQueue:
    """The counters are owned by the edge's loop (``open`` from the edge's start, before the
    loop runs); ``submit`` and the workers' callbacks run on other threads and only post or
    put."""

    def __init__(
        self,
        workers: int,
        stats: EdgeStats,
        replies: Replies,
        threads: EdgeThreads,
        *,
        ran: Callable[[str, Iterable[int]], None],
    ) -> None:
        self.workers = workers
        self._stats = stats
        self._replies = replies
        self._threads = threads
        self._ran = ran  # (model id, blocks): their sessions exist now
        self._outstanding = _Gauge()  # admitted, not finished: waiting or running
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

    def open(self) -> None:
        """(Re)start: nothing is outstanding."""
        self._outstanding = _Gauge()

    def load_factor(self) -> float:
        """Coarse load for discovery: queued plus running queries per worker."""
        return self._outstanding.value / self.workers

    async def drain(self, timeout: float) -> None:
        """Let queued and running queries finish (at most ``timeout`` s)."""
        end = time.monotonic() + timeout
        while self._outstanding.value and time.monotonic() < end:
            await asyncio.sleep(0.01)

    def submit(self, h: Query, body: memoryview, arrived: float, ex: OnnxExecutor) -> None:
        """A validated query (any thread): to the workers' queue, run as soon as one is free.
        Dropped when the edge is stopping (its devices see it go offline)."""
        job = _QueryJob(h, body, arrived, ex)
        gauge = self._outstanding
        gauge.add(1)
        fut = self._threads.on_worker(_run_query, job)
        if fut is None:
            gauge.add(-1)
            return
        fut.add_done_callback(functools.partial(self._worker_done, job, gauge))

    def _worker_done(
        self,
        job: _QueryJob,
        gauge: _Gauge,
        fut: concurrent.futures.Future[tuple[bytes, float, float]],
    ) -> None:
        """On the worker, as its run ends: the result straight to the device (paho's
        publish is thread-safe). A result waits in ``_done`` for the loop to count it when it
        next reads its counters (``count``): waking the loop for each one would compete with
        the answer's way out (+0.25 ms a query on loopback). A failure goes to the loop now,
        which answers it with an error frame."""
        gauge.add(-1)
        if fut.cancelled():
            return
        if fut.exception() is not None:
            self._threads.post(self._failed, job, fut)
            return
        frame, queue_ms, exec_ms = fut.result()
        self._replies.publish(job.header.device, frame)
        self._done.put((job.header, queue_ms, exec_ms))
        if self._done.qsize() >= COUNT_EVERY:  # bounded, however rarely the loop reads
            self._threads.post(self.count)

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

    def _failed(
        self, job: _QueryJob, fut: concurrent.futures.Future[tuple[bytes, float, float]]
    ) -> None:
        """A worker's failure, on the loop: answered with an error frame."""
        h = job.header
        try:
            fut.result()
        except ProtocolError as e:
            self._replies.error(e)
        except Exception as e:  # a job that raised: the worker lives on
            log.exception("query %s failed", h.request_id)
            self._replies.error(
                ProtocolError(
                    ErrorCode.INTERNAL,
                    f"{type(e).__name__}: {e}",
                    request_id=h.request_id,
                    device=h.device,
                )
            )
