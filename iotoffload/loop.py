"""One owner of an agent's mutable state: an asyncio event loop on a thread of its own.

Modelled on python-zeroconf: the loop thread owns the state; everything else (paho's network
threads, zeroconf's threads, timers, the caller) only *posts* work to it (``post``) or hops into
it and waits for the answer (``run``). Blocking work (model runs, disk I/O, broker connects)
goes to executors (``blocking``) and its result comes back as an awaited value on the loop.
No lock is needed for loop-owned state, and none is ever held across I/O or a wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoopClosedError(RuntimeError):
    """Work was posted to a loop that has stopped."""


class AgentLoop:
    """An asyncio loop running on a daemon thread named ``name``.

    Owned by: whoever created it; ``close()`` stops it and joins its thread and executor.
    """

    def __init__(self, name: str, *, workers: int = 4) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"{name}-io"
        )
        self._loop.set_default_executor(self._executor)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.set_exception_handler(self._on_exception)
        self._loop.run_forever()

    def _on_exception(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        # a failed callback or task must never stop the loop that owns every piece of state
        exc = ctx.get("exception")
        log.error("%s: %s", self.name, ctx.get("message"), exc_info=exc)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon (from any thread; never blocks). Dropped
        silently once the loop is closed: a late network callback has nobody to tell."""
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):  # closed between the check and the call
            self._loop.call_soon_threadsafe(fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop from any thread; its future, not awaited."""
        if self._closed:
            coro.close()
            raise LoopClosedError(f"{self.name} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Hop into the loop, run ``coro`` there and wait for its result (from another
        thread only: on the loop thread itself this would deadlock)."""
        if self.in_loop():
            coro.close()
            raise RuntimeError(f"{self.name}.run() called on its own loop thread")
        fut = self.spawn(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"{self.name}: no answer within {timeout} s") from None

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run a plain function on the loop and return its result (a read of loop state).
        Once the loop has stopped, nobody else owns the state: ``fn`` runs right here."""

        async def _call() -> T:
            return fn()

        if self.in_loop() or (self._closed and not self._thread.is_alive()):
            return fn()
        return self.run(_call(), timeout)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Await ``fn(*args)`` run on the executor (for code on the loop)."""
        return await self._loop.run_in_executor(self._executor, fn, *args)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel the loop's tasks, stop it, join its thread and its executor."""
        if self._closed:
            return
        self._closed = True

        async def _shutdown() -> None:
            me = asyncio.current_task()
            for _ in range(10):  # a cancelled task may start another: until none is left
                tasks = [t for t in asyncio.all_tasks() if t is not me]
                if not tasks:
                    break
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        if self.in_loop():  # from a callback of its own: cancel and stop, join nothing
            for t in asyncio.all_tasks(self._loop):
                t.cancel()
            self._loop.call_soon(self._loop.stop)
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(timeout)
            except (concurrent.futures.TimeoutError, RuntimeError):
                log.warning("%s: tasks did not finish within %g s", self.name, timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)
        if not self._thread.is_alive():
            self._loop.close()
