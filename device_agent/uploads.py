"""The device's one upload coordinator: the upload to the current edge (it follows handoffs)
and the proactive fill of the likely next edge.

Owned by the device agent's loop: both uploads are tasks there, started and followed only by
the coordinator, so a move and the upload's exit decision never race.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from device_agent.edge_session import EdgeSession, Progress

log = logging.getLogger(__name__)


class UploadCoordinator:
    """Owned by the device agent's loop; ``wait`` is safe from any thread."""

    def __init__(
        self,
        *,
        current: Callable[[], EdgeSession],
        order: Callable[[], list[int]],
        rate_Bps: float | None,  # noqa: N803
        stopping: Callable[[], bool],
    ) -> None:
        self._current = current
        self._order = order
        self.rate_Bps = rate_Bps
        self._stopping = stopping
        self.wanted = False  # an upload was asked for: after a move it goes on
        self.progress: Progress | None = None
        self.block_timeout = 30.0
        self._task: asyncio.Task[None] | None = None
        self._fill: asyncio.Task[None] | None = None
        self.fill_target: str | None = None
        self.failure: BaseException | None = None  # why the last upload task died, if it did
        self._idle = threading.Event()  # no main upload running (read by waiting threads)
        self._idle.set()
        self.started_at: float | None = None
        self.finished_at: float | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, progress: Progress | None = None, block_timeout: float = 30.0) -> None:
        """Upload the current edge what it lacks (no-op while that upload runs)."""
        self.wanted = True
        if progress is not None:
            self.progress = progress
        self.block_timeout = block_timeout
        if self.started_at is None:
            self.started_at = time.perf_counter()
        self.follow()

    def follow(self) -> None:
        """After a move (or a start): a running upload goes on with the new edge by itself;
        otherwise start one."""
        if not self.wanted or self.running or self._stopping():
            return
        self._idle.clear()
        self.finished_at = None
        self.failure = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="upload")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            log.error("upload failed", exc_info=self.failure)

    async def _run(self) -> None:
        try:
            while not self._stopping():
                s = self._current()

                def active(s: EdgeSession = s) -> bool:
                    return self._current() is s and not self._stopping()

                await s.upload(
                    self._order(),
                    self.progress,
                    active=active,
                    rate_Bps=self.rate_Bps,
                    block_timeout=self.block_timeout,
                )
                if self._current() is s:  # done with the edge it started on: stop
                    break
        finally:
            self.finished_at = time.perf_counter()
            self._idle.set()

    def wait(self, timeout: float | None = None) -> bool:
        """From any thread but the loop's: True once no main upload runs."""
        return self._idle.wait(timeout)

    @property
    def seconds(self) -> float | None:
        """How long the main upload took, once it ended."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    # proactive fill ---------------------------------------------------------------------------
    def fill(
        self,
        target: EdgeSession,
        transfer: bool,
        rate_Bps: float,  # noqa: N803
    ) -> None:
        """Fill ``target`` (the likely next edge) in the background: by transfer from the
        current edge where it can, the rest from the device at ``rate_Bps``."""
        if self.fill_target is not None:
            return
        self.fill_target = target.edge_id
        self._fill = asyncio.get_running_loop().create_task(
            self._run_fill(target, transfer, rate_Bps), name="proactive"
        )
        self._fill.add_done_callback(self._fill_ended)

    def _fill_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("proactive fill failed", exc_info=task.exception())
            self.fill_target = None  # another edge (or this one) may be filled later

    async def _run_fill(
        self,
        s: EdgeSession,
        transfer: bool,
        rate_Bps: float,  # noqa: N803
    ) -> None:
        if await s.announce(3.0) is None:
            self.fill_target = None
            return
        cur = self._current()
        want = [i for i in self._order() if i not in s.stored]
        if transfer and cur is not s and cur.online:
            asked = [i for i in want if i in cur.stored]
            if asked:
                log.info(
                    "proactive: %s fetches %d blocks from %s", s.edge_id, len(asked), cur.edge_id
                )
                s.request_transfer(cur, asked)

        def active() -> bool:
            return not self._stopping() and self._current() is not s

        await s.upload(want, active=active, rate_Bps=rate_Bps)

    def moved_to(self, edge_id: str) -> None:
        if self.fill_target == edge_id:  # done: the next edge may be filled later
            self.fill_target = None
