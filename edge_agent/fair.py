"""The query queue's policy: bounded per device, in total and in bytes, served round-robin
between devices so one that floods the edge waits behind its own queries, not everyone's.

Thread-safe (the network threads put, the worker threads get); its lock guards memory
operations only. The policy itself is plain and tested on hand-checkable cases.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class QueueLimits:
    per_device: int = 32
    total: int = 256
    max_bytes: int = 512 * 1024 * 1024


class FairQueue(Generic[T]):
    """Items queued per device; ``get`` takes the next device's oldest item in turn."""

    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits or QueueLimits()
        self._cond = threading.Condition(threading.Lock())
        self._queues: dict[str, deque[tuple[T, int]]] = {}
        self._turns: deque[str] = deque()  # devices with queued items, next first
        self._count = 0
        self._bytes = 0
        self._closed = False
        self._batching = 0  # take_matching calls waiting for more

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._bytes

    def queued_for(self, device: str) -> int:
        with self._cond:
            q = self._queues.get(device)
            return len(q) if q else 0

    def put(self, device: str, item: T, nbytes: int = 0) -> str | None:
        """Queue ``item``; None when taken, else why not (the queue is full for this device,
        in total, or in bytes; or closed)."""
        lim = self.limits
        with self._cond:
            if self._closed:
                return "the edge is stopping"
            q = self._queues.get(device)
            if q is not None and len(q) >= lim.per_device:
                return f"{len(q)} queries of {device} queued (limit {lim.per_device})"
            if self._count >= lim.total:
                return f"{self._count} queries queued (limit {lim.total})"
            if self._count and self._bytes + nbytes > lim.max_bytes:  # one always fits
                return f"{self._bytes + nbytes} bytes of queries queued (limit {lim.max_bytes})"
            if q is None:
                q = self._queues[device] = deque()
                self._turns.append(device)
            q.append((item, nbytes))
            self._count += 1
            self._bytes += nbytes
            if self._batching:  # a batch may be waiting for this one; or it does not match
                self._cond.notify_all()
            else:
                self._cond.notify()
            return None

    def get(self, timeout: float | None = None, wake: Callable[[], bool] | None = None) -> T | None:
        """The next item in the round: the oldest of the device whose turn it is. None when
        ``timeout`` passed, the queue is closed and empty, or ``wake()`` says there is other
        work (checked whenever ``poke`` is called)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._count:
                if self._closed or (wake is not None and wake()):
                    return None
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            device = self._turns.popleft()
            q = self._queues[device]
            item, nbytes = q.popleft()
            if q:
                self._turns.append(device)  # its next item waits for everyone else's turn
            else:
                del self._queues[device]
            self._count -= 1
            self._bytes -= nbytes
            return item

    def take_matching(self, match: Callable[[T], bool], n: int, wait_s: float = 0.0) -> list[T]:
        """Up to ``n`` more items ``match`` accepts, for a batch: in turn, each device's
        oldest item when it matches (one per device per round, so a device with many
        queued does not fill the batch before the others; a device's items stay in order:
        one that does not match keeps its later ones back). Waits up to ``wait_s`` for
        more to arrive when fewer than ``n`` are queued; never for a closed queue."""
        got: list[T] = []
        end = time.monotonic() + wait_s
        with self._cond:
            while True:
                took = True
                while took and len(got) < n:
                    took = False
                    for device in list(self._turns):
                        if len(got) >= n:
                            break
                        q = self._queues[device]
                        item, nbytes = q[0]
                        if not match(item):
                            continue
                        q.popleft()
                        self._turns.remove(device)
                        if q:
                            self._turns.append(device)
                        else:
                            del self._queues[device]
                        self._count -= 1
                        self._bytes -= nbytes
                        got.append(item)
                        took = True
                left = end - time.monotonic()
                if len(got) >= n or left <= 0 or self._closed:
                    return got
                self._batching += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._batching -= 1

    def poke(self) -> None:
        """Wake every waiting ``get`` so it checks its ``wake``."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> list[T]:
        """Take no more; wake the getters; the items still queued (to be answered)."""
        with self._cond:
            self._closed = True
            left = [item for q in self._queues.values() for item, _ in q]
            self._queues.clear()
            self._turns.clear()
            self._count = self._bytes = 0
            self._cond.notify_all()
            return left

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
