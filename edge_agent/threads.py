"""Where the edge's work runs: its loop (``edge-loop``, the one owner of its state) and the
threads of its blocking work, whose results come back to the loop.

- ``edge-store``: the block store's one writer (chunks, blocks, models);
- ``edge-loader``: a completed block is assembled, digest-checked and screened, then loaded
  and profiled in the probe process (a query never waits behind a 100 MB block);
- ``edge-zeroconf``: advertisement updates.

The query workers (``edge-worker_N``, each driving one ONNX Runtime process) are the
``QueryQueue``'s own threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from iotoffload.loop import AgentLoop, LoopClosedError

log = logging.getLogger(__name__)
T = TypeVar("T")


class EdgeThreads:
    """The loop and the pools. Made (``open``) and joined (``shutdown_*``, ``close``) by the
    edge's owner in ``start``/``stop``; ``post`` and ``call`` from any thread; ``spawn`` and
    the ``on_*`` submits on the loop."""

    def __init__(self) -> None:
        self.loop: AgentLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._store: ThreadPoolExecutor | None = None
        self._loader: ThreadPoolExecutor | None = None
        self._zeroconf: ThreadPoolExecutor | None = None

    def open(self) -> AgentLoop:
        """The loop (returned) and the pools' executors (a pool's threads start on first
        use)."""
        self.loop = lp = AgentLoop("edge-loop", workers=1)
        self._store = ThreadPoolExecutor(1, thread_name_prefix="edge-store")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="edge-loader")
        self._zeroconf = ThreadPoolExecutor(1, thread_name_prefix="edge-zeroconf")
        return lp

    def shutdown_zeroconf(self) -> None:
        if self._zeroconf is not None:
            self._zeroconf.shutdown(wait=True, cancel_futures=True)

    def shutdown_pools(self) -> None:
        """Join the store and the loader: running jobs finish (and post back); queued ones
        are dropped."""
        for pool in (self._store, self._loader):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Stop the loop and forget every pool (``shutdown_*`` joined them)."""
        if self.loop is not None:
            self.loop.close()
        self.loop = None
        self._store = self._loader = self._zeroconf = None

    # hopping into the loop ----------------------------------------------------------------
    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (from any thread; dropped when not running)."""
        lp = self.loop
        if lp is not None:
            lp.post(fn, *args)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the loop, its result here. Before ``start`` and after ``stop`` nothing
        else touches the state: ``fn`` runs on the caller's thread."""
        lp = self.loop
        if lp is not None:
            with contextlib.suppress(LoopClosedError, concurrent.futures.CancelledError):
                return lp.call(fn, timeout=30)
        return fn()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task on the loop, kept alive until done; an unexpected failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("edge task failed", exc_info=task.exception())

    # blocking work, from the loop ---------------------------------------------------------
    def on_store(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._submit(self._store, fn, *args)

    def on_loader(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._submit(self._loader, fn, *args)

    def on_zeroconf(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._submit(self._zeroconf, fn, *args)

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
