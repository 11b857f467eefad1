"""When to move to another edge: the decision alone, without transport (unit-testable).

Triggers, in order: a preferred edge (forced by the user or a control message); the current
edge offline; its round-trip time over a limit; too many recent deadline misses; another edge
predicted faster by ``margin`` for ``dwell_s`` seconds in a row. After a move, only a forced or
offline move may happen within ``hold_s`` (no flapping between two similar edges).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EdgeView:
    """What the device knows of one edge right now."""

    id: str
    online: bool
    predicted_ms: float  # the planner's latency for the next query with this edge's blocks
    rtt_ms: float
    misses: int = 0  # deadline misses in the recent window
    stored: int = 0  # blocks of my model it holds


@dataclass(frozen=True)
class Move:
    target: str
    reason: str


@dataclass
class HandoffPolicy:
    """The move decision with its hysteresis state; owned by the device agent's loop."""

    margin: float = 0.2  # another edge must be predicted this much faster …
    dwell_s: float = 3.0  # … for this long
    rtt_limit_ms: float = 250.0
    miss_limit: int = 3
    hold_s: float = 5.0
    _better_since: dict[str, float] = field(default_factory=dict, repr=False)
    _last_move: float = field(default=-1e9, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1:
            raise ValueError("margin must be within [0, 1)")
        if self.dwell_s < 0 or self.hold_s < 0 or self.rtt_limit_ms <= 0 or self.miss_limit < 1:
            raise ValueError("dwell_s, hold_s >= 0; rtt_limit_ms > 0; miss_limit >= 1")

    @staticmethod
    def best(views: list[EdgeView]) -> EdgeView | None:
        up = [v for v in views if v.online]
        return min(up, key=lambda v: (v.predicted_ms, -v.stored, v.rtt_ms, v.id), default=None)

    def alone(self) -> None:
        """No other edge to compare with (what ``decide`` concludes from no others, without
        the views): no move, and no edge stays "better" over the gap."""
        self._better_since.clear()

    def decide(
        self,
        current: EdgeView,
        others: list[EdgeView],
        *,
        prefer: str | None = None,
        now: float | None = None,
    ) -> Move | None:
        now = time.monotonic() if now is None else now
        move = self._decide(current, [v for v in others if v.id != current.id], prefer, now)
        if move is not None:
            self._last_move = now
            self._better_since.clear()
        return move

    def _decide(
        self, cur: EdgeView, others: list[EdgeView], prefer: str | None, now: float
    ) -> Move | None:
        if prefer is not None:
            if prefer == cur.id:
                return None
            for v in others:
                if v.id == prefer and v.online:
                    return Move(v.id, "preferred")
        best = self.best(others)
        if not cur.online:
            return Move(best.id, "current edge offline") if best else None
        if best is None:
            self._better_since.clear()
            return None
        held = now - self._last_move < self.hold_s
        if cur.rtt_ms > self.rtt_limit_ms and best.rtt_ms <= self.rtt_limit_ms and not held:
            return Move(best.id, f"rtt {cur.rtt_ms:.0f} ms > {self.rtt_limit_ms:g} ms")
        if cur.misses >= self.miss_limit and best.misses < self.miss_limit and not held:
            return Move(best.id, f"{cur.misses} deadline misses")
        for v in others:  # hysteresis: keep only edges that stay better
            if not (v.online and v.predicted_ms < cur.predicted_ms * (1 - self.margin)):
                self._better_since.pop(v.id, None)
        if best.predicted_ms < cur.predicted_ms * (1 - self.margin):
            since = self._better_since.setdefault(best.id, now)
            if now - since >= self.dwell_s and not held:
                return Move(
                    best.id, f"predicted {best.predicted_ms:.1f} ms vs {cur.predicted_ms:.1f} ms"
                )
        return None
