"""Where each offloaded query's one answer is decided.

A query's answer can come from several threads: the edge's result (paho's network thread),
its deadline, the edge going offline or the agent closing (the loop), or the caller giving up
on a loop that went away. ``Answers`` is the single point they all go through: a query's slot
is taken out of the registry by exactly one of them (an atomic pop under a lock held for that
memory operation only), and only that one sets the caller's future. So every query gets
exactly one answer and whoever lost knows it (``answer`` returns False).

The result goes from the network thread straight to the caller this way, without a hop
through the loop; the loop hears of it right after (``PendingReplies.on_result``) to learn
from it and to clear the query's deadline.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Generic, TypeVar

V = TypeVar("V")


class Answers(Generic[V]):
    """Request id -> the caller's future. Any thread; no lock is held across a wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the dict and the flag below: memory operations only
        self._waiting: dict[str, concurrent.futures.Future[V]] = {}
        # rid -> (who may answer it, what the answer must look like), for answers from outside
        self._guards: dict[str, tuple[str, object]] = {}
        self._closed: V | None = None  # once closed: the answer of every query opened later

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)

    def open(
        self, rid: str, source: str | None = None, expect: object = None
    ) -> concurrent.futures.Future[V]:
        """A slot for ``rid`` (before its query is published); answered at once when the
        registry is closed. ``source`` (the edge asked) and ``expect`` (the result's shape) are
        what ``accepts`` checks an answer from the network against."""
        fut: concurrent.futures.Future[V] = concurrent.futures.Future()
        with self._lock:
            closed = self._closed
            if closed is None:
                self._waiting[rid] = fut
                if source is not None:
                    self._guards[rid] = (source, expect)
        if closed is not None:
            fut.set_result(closed)
        return fut

    def answer(self, rid: str, value: V) -> bool:
        """Answer ``rid`` with ``value``: True when this call answered it, False when it has
        its answer already (or was never opened)."""
        with self._lock:
            fut = self._waiting.pop(rid, None)
            self._guards.pop(rid, None)
        if fut is None:
            return False
        fut.set_result(value)  # only the one that popped the slot gets here
        return True

    def accepts(self, rid: str, source: str, got: object = None) -> bool:
        """Whether an answer to ``rid`` from ``source`` (looking like ``got``, when given) may
        answer it: only the edge asked may, with the shape asked for. True for an id without
        a slot (a late answer: counted, never delivered)."""
        with self._lock:
            guard = self._guards.get(rid)
        if guard is None:
            return True
        want_source, want = guard
        return source == want_source and (got is None or want is None or got == want)

    def close(self, value: V) -> list[str]:
        """Answer every waiting query with ``value``, and every one opened from now on; the
        ids answered here."""
        with self._lock:
            self._closed = value
            waiting, self._waiting = self._waiting, {}
            self._guards.clear()
        for fut in waiting.values():
            fut.set_result(value)
        return list(waiting)
