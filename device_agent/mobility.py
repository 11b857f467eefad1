"""Mobility: keep every candidate edge fresh, decide when to move (``HandoffPolicy``), move,
and start the proactive fill of the likely next edge.

Owned by the device agent's loop: the monitor is a task there, woken by a tick or by news
(a status, a zeroconf change, a missed deadline). A move awaits the new edge's connection and
announce on the loop without blocking anything else; moves run one after another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from device_agent.candidates import Candidates
from device_agent.edge_session import EdgeSession
from device_agent.handoff import EdgeView, HandoffPolicy
from iotoffload.planning import single_split_plan

if TYPE_CHECKING:
    from device_agent.agent import DeviceAgent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandoffEvent:
    at: float  # time.monotonic()
    source: str
    target: str
    reason: str
    target_had: int  # blocks the new edge already held
    transfer: int  # blocks asked from the old edge over the backhaul


class HandoffController:
    """Owned by the device agent's loop."""

    def __init__(
        self,
        agent: DeviceAgent,
        candidates: Candidates,
        policy: HandoffPolicy | None,
        session_for: Callable[[str], Awaitable[EdgeSession | None]],
        *,
        probe_interval: float,
        transfer: bool,
        proactive: bool,
        proactive_rate_Bps: float,  # noqa: N803
    ) -> None:
        self._agent = agent
        self.candidates = candidates
        self.policy = policy
        self._session_for = session_for
        self.probe_interval = probe_interval
        self.transfer = transfer
        self.proactive = proactive
        self.proactive_rate_Bps = proactive_rate_Bps
        self.handoffs: list[HandoffEvent] = []
        self._wake = asyncio.Event()
        self._moving: asyncio.Future[bool] | None = None
        self._opening: set[str] = set()  # edges whose session is being made

    def wake(self) -> None:
        self._wake.set()

    # the monitor --------------------------------------------------------------------------
    async def run(self, tick: float = 0.25) -> None:
        last_probe = 0.0
        while True:
            await self._sleep(self._next_round(tick, last_probe))
            self._wake.clear()
            try:
                now = time.monotonic()
                if now - last_probe >= self.probe_interval:
                    last_probe = now
                    self._probe_all(now)
                await self._maybe_move(now)
                if self.proactive:
                    self._maybe_proactive()
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must outlive any one bad round
                log.exception("handoff monitor round failed")

    def _next_round(self, tick: float, last_probe: float) -> float:
        """Seconds until the next round unless woken: ``tick`` while there is another edge
        to weigh (the policy's dwell and miss windows are timed), else until the next
        probe. A device alone with its edge woke 4 times a second for nothing: ~2.5 ms of
        CPU a second on a slowed device, part of every uploaded MB's cost."""
        if len(self.candidates.all()) > 1 or len(self._agent.sessions) > 1 or self._opening:
            return tick
        return max(tick, last_probe + self.probe_interval - time.monotonic())

    async def _sleep(self, timeout: float) -> None:
        """Until woken or ``timeout``. A timer, not asyncio.wait_for, which makes a task
        per round."""
        if self._wake.is_set():
            return
        timer = asyncio.get_running_loop().call_later(timeout, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    def _probe_all(self, now: float) -> None:
        """Keep every candidate fresh: RTT and inventory by a hello. The current edge is
        probed only when idle (replies to queries keep its estimates fresh). A candidate not
        yet connected gets its session opened in the background: no round waits for it."""
        a = self._agent
        for c in self.candidates.all():
            if not c.online or (
                c.id == a.edge_id and now - a.queries.last_query < self.probe_interval
            ):
                continue
            s = a.sessions.get(c.id)
            if s is None:
                self._open(c.id)
            elif s.link.connected:
                s.hello()

    def _open(self, edge_id: str) -> None:
        if edge_id in self._opening:
            return
        self._opening.add(edge_id)

        async def open_session() -> None:
            try:
                s = await self._session_for(edge_id)
                if s is not None and s.link.connected:
                    s.hello()
            finally:
                self._opening.discard(edge_id)

        asyncio.get_running_loop().create_task(open_session(), name=f"open-{edge_id}")

    def views(self, now: float) -> tuple[EdgeView, list[EdgeView]]:
        a = self._agent

        def view(s: EdgeSession) -> EdgeView:
            c = self.candidates.get(s.edge_id)
            online = s.online and s.link.connected and (c is None or c.online)
            # what the next query would cost with this edge: never worse than running it all
            # locally (a fixed split the edge cannot serve yet runs locally, too)
            plan = a.queries.plan_for(s)
            ms = single_split_plan(s.inputs, a.pkg.num_blocks).latency_ms
            if plan.edge_blocks <= s.stored:
                ms = min(ms, plan.latency_ms)
            return EdgeView(
                s.edge_id,
                online,
                ms,
                s.inputs.estimates.rtt_ms,
                s.recent_misses(now),
                len(s.stored),
            )

        cur = a.session
        others = [view(s) for s in a.sessions.values() if s is not cur and s.inventory_seen]
        return view(cur), others

    async def _maybe_move(self, now: float) -> None:
        a = self._agent
        if not any(s is not a.session and s.inventory_seen for s in a.sessions.values()):
            # no edge to move to: skip the views (a plan per session, every tick: about a
            # quarter of an idle device's CPU)
            if self.policy is not None:
                self.policy.alone()
            return
        cur, others = self.views(now)
        prefer = self._agent.prefer
        if self.policy is None:  # forced moves work without a policy
            if prefer and prefer != cur.id and any(v.id == prefer and v.online for v in others):
                await self.move_to(prefer, "preferred")
            return
        move = self.policy.decide(cur, others, prefer=prefer, now=now)
        if move is not None:
            await self.move_to(move.target, move.reason)

    # moving -------------------------------------------------------------------------------
    async def move_to(self, edge_id: str, reason: str = "requested", timeout: float = 3.0) -> bool:
        """Make ``edge_id`` the current edge. Queries in flight finish on the old edge (or
        locally); the new session starts from the blocks the new edge holds; the rest come from
        the old edge over the backhaul (``transfer``) or from this device. One move at a time:
        a second request waits for the first to end, then is judged afresh."""
        while self._moving is not None:
            await asyncio.shield(self._moving)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._moving = fut
        ok = False
        try:
            ok = await self._move(edge_id, reason, timeout)
        finally:
            self._moving = None
            fut.set_result(ok)
        return ok

    async def _move(self, edge_id: str, reason: str, timeout: float) -> bool:
        a = self._agent
        old = a.session
        if old.edge_id == edge_id:
            return True
        new = await self._session_for(edge_id)
        if new is None:
            log.warning("cannot move to %s: unknown or unreachable", edge_id)
            return False
        inv = await new.announce(timeout)
        if inv is None:
            return False
        want = [i for i in a.upload_order() if i not in new.stored]
        asked: list[int] = []
        reachable = old.online and old.link.connected and not old.recent_misses()
        if self.transfer and want and reachable:
            asked = [i for i in want if i in old.stored]
            if asked:
                new.request_transfer(old, asked)
        a.session = new
        a.uploads.moved_to(edge_id)
        ev = HandoffEvent(
            time.monotonic(), old.edge_id, edge_id, reason, len(inv.stored), len(asked)
        )
        self.handoffs.append(ev)
        log.info(
            "handoff %s → %s (%s): it holds %d blocks, %d by transfer",
            old.edge_id,
            edge_id,
            reason,
            ev.target_had,
            ev.transfer,
        )
        if want:
            a.uploads.follow()
        return True

    def _maybe_proactive(self) -> None:
        """Fill the likely next edge (the best other online one) once the current is full."""
        a = self._agent
        if not a.session.upload_complete or a.uploads.fill_target is not None:
            return
        _, others = self.views(time.monotonic())
        best = HandoffPolicy.best(others)
        if best is None:
            return
        s = a.sessions.get(best.id)
        if s is not None:
            a.uploads.fill(s, self.transfer, self.proactive_rate_Bps)
