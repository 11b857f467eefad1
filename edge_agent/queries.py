"""Queries: the queue of validated queries, the workers that run them on ONNX Runtime, and
their results (counted, then sent).

Owned by the edge's loop: the queue, ``in_flight`` and the idle event change only there. A
query runs on an ``edge-worker`` thread, which posts its result back to the loop to be counted
and then sends it to the device itself (the answer does not wait for the loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections import deque
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


@dataclass(frozen=True)
class _QueryJob:
    """A validated query waiting for a worker (in the loop's queue)."""

    header: Query
    body: memoryview
    arrived: float  # perf_counter() on the network thread
    executor: OnnxExecutor


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


class QueryQueue:
    """Owned by the edge's loop (``open`` from the edge's start, before the loop runs)."""

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
        self._queue: deque[_QueryJob] = deque()  # validated queries waiting for a worker
        self._idle: asyncio.Event | None = None

    @property
    def queued(self) -> int:
        """Queries waiting for a worker."""
        return len(self._queue)

    def open(self) -> None:
        self._idle = asyncio.Event()  # set while no query is queued or running
        self._idle.set()

    def load_factor(self) -> float:
        """Coarse load for discovery: queued plus running queries per worker."""
        return (len(self._queue) + self._stats.in_flight) / self.workers

    async def drain(self, timeout: float) -> None:
        """Let queued and running queries finish (at most ``timeout`` s)."""
        if self._idle is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)

    def submit(self, h: Query, body: memoryview, arrived: float, ex: OnnxExecutor) -> None:
        """A validated query: queued, and run as soon as a worker is free."""
        self._queue.append(_QueryJob(h, body, arrived, ex))
        self._pump()

    def _pump(self) -> None:
        """Hand queued queries to free workers (``in_flight`` counts the running ones)."""
        assert self._idle is not None
        while self._queue and self._stats.in_flight < self.workers:
            job = self._queue.popleft()
            h = job.header
            queue_ms = (time.perf_counter() - job.arrived) * 1e3
            if queue_ms > h.deadline_ms:  # the device has finished it locally: save the work
                self._replies.error(
                    ProtocolError(
                        ErrorCode.DEADLINE_EXPIRED,
                        f"waited {queue_ms:.0f} ms in the queue, deadline {h.deadline_ms:g} ms",
                        request_id=h.request_id,
                        device=h.device,
                    )
                )
                continue
            fut = self._threads.on_worker(_run_query, job, queue_ms)
            if fut is None:  # the edge is stopping
                break
            self._stats.in_flight += 1
            fut.add_done_callback(functools.partial(self._worker_done, job, queue_ms))
        if self._queue or self._stats.in_flight:
            self._idle.clear()
        else:
            self._idle.set()

    def _worker_done(
        self, job: _QueryJob, queue_ms: float, fut: concurrent.futures.Future[tuple[bytes, float]]
    ) -> None:
        """On the worker, as its run ends: the result goes to the loop to be counted, then
        straight to the device (paho's publish is thread-safe). Posted before it is sent, so
        whoever has the answer and then asks the loop sees it counted; sent from here, so the
        answer does not wait for the loop."""
        self._threads.post(self._query_done, job, queue_ms, fut)
        if not fut.cancelled() and fut.exception() is None:
            self._replies.publish(job.header.device, fut.result()[0])

    def _query_done(
        self, job: _QueryJob, queue_ms: float, fut: concurrent.futures.Future[tuple[bytes, float]]
    ) -> None:
        """A worker's result, back on the loop: count it (the worker sent it)."""
        self._stats.in_flight -= 1
        h = job.header
        try:
            _, exec_ms = fut.result()
        except concurrent.futures.CancelledError:
            pass
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
        else:
            s = self._stats
            s.queries += 1
            s.queue_ms_ewma += EWMA_ALPHA * (queue_ms - s.queue_ms_ewma)
            s.exec_ms_ewma += EWMA_ALPHA * (exec_ms - s.exec_ms_ewma)
            self._ran(h.model_id, range(h.start, h.end))
        self._pump()
