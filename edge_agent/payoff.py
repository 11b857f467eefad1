"""Whether batching a block range pays: from what its queries cost run alone and in batches,
as the edge's workers measure them (each run's wall time, the worker round trip included).

A batch makes each of its queries wait for all of them, so it must save more than timing
noise per query. Comparing the runtimes alone undersells batching: a batch also shares the
worker round trip, the copies and the queue's work, which for a small block range are most
of a query's cost. So the judgment compares the edge's own timings: once a range's blocks are
judged (the worker's ``gain``), its next ``settle`` batches give a moving average of the time
per query; against the average of its single runs (or, when it has run only in batches, the
worker's judged gain) above ``min_gain`` means batching stops for that range, once and for
all. Pure state, no I/O; one lock so that several worker threads may report.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable
from typing import Any

ALPHA = 0.2  # weight of each new run in the moving averages
SETTLE = 5  # judged batches averaged before the range is decided
MAX_RANGES = 4096  # ranges remembered; past that the oldest undecided ones are forgotten


class BatchPayoff:
    def __init__(self, min_gain: float, settle: int = SETTLE) -> None:
        self.min_gain = min_gain
        self.settle = settle
        self._lock = threading.Lock()
        # ms per query run alone; None: the range's first single run, left out
        self._single: dict[Hashable, float | None] = {}
        self._batched: dict[Hashable, tuple[float, int]] = {}  # ms per query, batches seen

    def single(self, key: Hashable, ms: float) -> None:
        """A query of range ``key`` ran alone in ``ms``. A range's first single run is left
        out: it may have made the sessions (a slow first value would decay only slowly and
        make any batch look worth it)."""
        if not math.isfinite(ms) or ms < 0:
            return
        with self._lock:
            first = key not in self._single
            old = self._single.pop(key, None)  # re-inserted: the most recent, evicted last
            self._single[key] = None if first else ms if old is None else old + ALPHA * (ms - old)
            _bound(self._single)

    def batched(self, key: Hashable, k: int, ms: float, gain: float | None) -> float | None:
        """A batch of ``k`` queries of range ``key`` ran in ``ms``; ``gain``: the worker's
        judged cost per query over one by one, None while it is judging the range's blocks.
        Returns the range's cost ratio when this batch decides that batching does not pay
        (the caller stops batching it), else None."""
        if gain is None or k < 2 or not math.isfinite(ms):
            return None  # batches that judge blocks are slower: not counted
        per = ms / k
        with self._lock:
            avg, n = self._batched.pop(key, (per, 0))
            avg = per if n == 0 else avg + ALPHA * (per - avg)
            n += 1
            self._batched[key] = (avg, n)
            _bound(self._batched)
            if n != self.settle:
                return None
            alone = self._single.get(key)
        ratio = avg / alone if alone else gain
        if not math.isfinite(ratio):
            return 1.0  # no sensible figure: batching is not shown to pay
        return ratio if ratio > self.min_gain else None


def _bound(d: dict[Hashable, Any]) -> None:
    while len(d) > MAX_RANGES:
        del d[next(iter(d))]  # the least recently updated
