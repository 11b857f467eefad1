"""Queries: the plan for each one, the device's segments on TFLite, the edge's segments over
MQTT, and the pending replies.

``QueryRunner.query`` runs on the caller's thread (TFLite runs there, off the loop). It hops
into the agent's loop twice at most: once to plan (the loop owns the estimates and the
exploration clock) and once per edge segment (publish, then await the reply there). Pending
replies are futures owned by the loop: a reply, its deadline and an edge going offline race
on the loop alone, so each query gets exactly one answer and a late one is counted once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from device_agent.edge_session import EdgeSession
from iotoffload.loop import AgentLoop, LoopClosedError
from iotoffload.model.package import ModelPackage
from iotoffload.planning import Plan, Planner, single_split_plan
from iotoffload.runtime.base import Array
from iotoffload.runtime.tflite import TFLiteExecutor
from iotoffload.transport.frame import Error, Query, Result, encode_tensor_frame, tensor_of
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)

# what a pending query ends with: the edge's result, its error, or why neither came
Reply = tuple[Result, memoryview] | Error | str


@dataclass
class QueryOutcome:
    index: int
    output: Array
    latency_ms: float
    split: int
    offloaded: bool
    reason: str  # "edge", or why it ran locally
    front_ms: float = 0.0
    edge_queue_ms: float | None = None
    edge_exec_ms: float | None = None
    wire_bytes: int = 0
    plan: str = ""
    predicted_ms: float = 0.0
    edge: str | None = None  # the edge that ran the offloaded part


@dataclass
class _Pending:
    future: asyncio.Future[Reply]
    edge: str
    timer: asyncio.TimerHandle


class PendingReplies:
    """Requests waiting for an edge. Owned by the device agent's loop."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self.late_answers = 0  # results that came after their query was answered otherwise

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, rid: str, edge: str, deadline_s: float) -> asyncio.Future[Reply]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        timer = loop.call_later(deadline_s, self.resolve, rid, "deadline passed")
        self._pending[rid] = _Pending(fut, edge, timer)
        return fut

    def resolve(self, rid: str, value: Reply) -> bool:
        """Answer ``rid`` with ``value``; False when it has its answer already."""
        p = self._pending.pop(rid, None)
        if p is None:
            return False
        p.timer.cancel()
        if not p.future.done():
            p.future.set_result(value)
        return True

    def on_result(self, h: Result, body: memoryview) -> None:
        if not self.resolve(h.request_id, (h, body)):
            self.late_answers += 1  # ignored: the query already has its one answer

    def on_error(self, h: Error) -> bool:
        """True when the error answered a pending query."""
        return h.request_id is not None and self.resolve(h.request_id, h)

    def release(self, edge: str) -> None:
        """An edge went offline: queries waiting on it finish locally at once."""
        for rid in [r for r, p in self._pending.items() if p.edge == edge]:
            self.resolve(rid, "edge went offline")


class QueryRunner:
    """Plans and runs queries. Its clocks and the pending replies are owned by the agent's
    loop; ``query`` itself runs on the caller's thread."""

    def __init__(
        self,
        pkg: ModelPackage,
        tfl: TFLiteExecutor,
        planner: Planner,
        *,
        device_id: str,
        topics: Topics,
        fixed_split: int | None,
        deadline_ms: float | None,
        explore_s: float | None,
        explore_margin: float,
        current: Callable[[], EdgeSession],
        loop: Callable[[], AgentLoop | None],
        on_miss: Callable[[], None],
    ) -> None:
        self.pkg = pkg
        self.tfl = tfl
        self.planner = planner
        self.device_id = device_id
        self.topics = topics
        self.fixed_split = fixed_split
        self.deadline_ms = deadline_ms
        # Estimates come from replies: a device that went local gets none and could stay local
        # on a stale (e.g. upload-depressed) bandwidth estimate. So every ``explore_s`` it sends
        # one query by the best offloading plan when that is predicted within ``explore_margin``
        # of the local plan (None: never explore).
        self.explore_s = explore_s
        self.explore_margin = explore_margin
        self._current = current
        self._loop = loop
        self._on_miss = on_miss
        self.pending = PendingReplies()
        self._ids = itertools.count()
        self.last_reply = time.monotonic()
        self.last_query = 0.0

    # planning (pure reads of frozen snapshots, plus the loop-owned clocks) -----------------
    def plan_for(self, s: EdgeSession) -> Plan:
        """The plan for the next query on edge ``s``, over the blocks it holds now."""
        if self.fixed_split is not None:  # missing blocks make it finish locally, saying so
            return single_split_plan(s.inputs, max(self.fixed_split, s.inputs.min_local))
        return self.planner.plan(s.inputs, s.stored)

    def auto_deadline_ms(self, s: EdgeSession, start: int, predicted_ms: float = 0.0) -> float:
        """Wait for the edge about twice what finishing locally from ``start`` would take (or
        the plan's prediction, whichever is larger)."""
        local = sum(s.inputs.profile.device_ms[start:])
        return max(100.0, 2.0 * max(local, predicted_ms) + 50.0)

    def exploration(self, s: EdgeSession, local: Plan) -> Plan | None:
        """The best single-split offloading plan over the blocks ``s`` holds, when no reply
        refreshed the estimates for ``explore_s`` and it is predicted close to ``local``."""
        if self.explore_s is None or self.fixed_split is not None or self.planner.name == "local":
            return None
        if s.inputs.objective != "latency":  # the comparison below is in milliseconds
            return None
        if time.monotonic() - self.last_reply < self.explore_s or not s.online:
            return None
        n, stored = self.pkg.num_blocks, s.stored
        options = [
            single_split_plan(s.inputs, k)
            for k in range(s.inputs.min_local, n)
            if all(i in stored for i in range(k, n))
        ]
        best = min(options, key=lambda p: p.latency_ms, default=None)
        if best is None or best.latency_ms > local.latency_ms * (1 + self.explore_margin):
            return None
        self.last_reply = time.monotonic()  # one exploring query per period, answered or not
        return best

    def _plan(self, s: EdgeSession, split: int | None) -> tuple[Plan, str]:
        """(plan, reason) for one query; on the loop when it runs (it owns the clocks)."""
        self.last_query = time.monotonic()
        plan = single_split_plan(s.inputs, split) if split is not None else self.plan_for(s)
        reason = "planned local" if not plan.offloads else "edge"
        if split is None and not plan.offloads:
            explore = self.exploration(s, plan)
            if explore is not None:
                return explore, "explore"
        return plan, reason

    @staticmethod
    def why_not_remote(s: EdgeSession, start: int, end: int) -> str:
        if not s.link.connected:
            return "broker unreachable"
        if not s.online:
            return "edge offline"
        if not s.has(start, end):
            return "blocks not uploaded yet"
        return ""

    # one query (caller's thread) --------------------------------------------------------------
    def query(self, x: Array, index: int = 0, split: int | None = None) -> QueryOutcome:
        """Run one query by the current plan; an edge segment that fails (deadline, error,
        edge offline) is finished on the device. Exactly one answer, always."""
        n = self.pkg.num_blocks
        s = self._current()  # a move during this query affects the next one
        loop = self._loop()
        try:
            if loop is None:
                raise LoopClosedError("no loop")
            plan, reason = loop.call(lambda: self._plan(s, split))
        except LoopClosedError:  # the agent closed: nothing else runs, plan right here
            plan, reason = self._plan(s, split)
            loop = None
        t0 = time.perf_counter()
        y = x
        front_ms = 0.0
        offloaded = False
        info: dict[str, float] = {}
        for seg in plan.segments:
            if seg.where == "device":
                y, times = self.tfl.run_timed(seg.start, seg.end, y)
                if not offloaded:
                    front_ms += sum(times) * 1e3
                continue
            why = self.why_not_remote(s, seg.start, seg.end) if loop else "broker unreachable"
            got: Array | str = why
            if not why and loop is not None:
                got = self._run_remote(loop, s, seg.start, seg.end, y, plan.latency_ms, info)
            if isinstance(got, str):
                reason = got
                y = self.tfl.run(seg.start, n, y)  # finish on the device
                break
            y, offloaded = got, True
        out = QueryOutcome(
            index,
            y,
            (time.perf_counter() - t0) * 1e3,
            plan.split,
            offloaded,
            reason,
            front_ms,
        )
        out.plan, out.predicted_ms = plan.describe(), plan.latency_ms
        out.edge = s.edge_id if offloaded else None
        out.edge_queue_ms = info.get("queue_ms")
        out.edge_exec_ms = info.get("exec_ms")
        out.wire_bytes = int(info.get("wire_bytes", 0))
        return out

    def _run_remote(
        self,
        loop: AgentLoop,
        s: EdgeSession,
        start: int,
        end: int,
        x: Array,
        predicted_ms: float,
        info: dict[str, float],
    ) -> Array | str:
        rid = f"{self.device_id}-{next(self._ids)}"  # count's next() is atomic
        deadline = self.deadline_ms or self.auto_deadline_ms(s, start, predicted_ms)
        payload = encode_tensor_frame(  # encoded here, off the loop: the tensor's one copy
            Query,
            x,
            request_id=rid,
            device=self.device_id,
            model_id=self.pkg.manifest.model_id,
            start=start,
            end=end,
            deadline_ms=deadline,
        )
        try:
            return loop.run(self.remote(s, start, end, rid, payload, deadline, info))
        except (LoopClosedError, concurrent.futures.CancelledError):
            return "agent closed"

    # on the loop ------------------------------------------------------------------------------
    async def remote(
        self,
        s: EdgeSession,
        start: int,
        end: int,
        rid: str,
        payload: bytes,
        deadline: float,
        info: dict[str, float],
    ) -> Array | str:
        """Run [start, end) on edge ``s``: the output, or why not."""
        fut = self.pending.add(rid, s.edge_id, deadline / 1e3)
        t_send = time.perf_counter()
        clean = s.query_started()
        try:
            s.link.publish(self.topics.edge_query(s.edge_id), payload, expiry_s=deadline / 1e3)
            reply = await fut
        finally:
            s.query_done()
            self.pending.resolve(rid, "cancelled")  # no-op unless we were cancelled
        rt_ms = (time.perf_counter() - t_send) * 1e3
        if isinstance(reply, Error):
            return f"edge error: {reply.code}"
        if isinstance(reply, str):
            if reply == "deadline passed":
                if not s.online:
                    return "edge went offline"
                s.observe(lambda e: e.observe_timeout(deadline))
                s.misses.append(time.monotonic())
                self._on_miss()
            return reply
        h, body = reply
        y = np.array(tensor_of(h, body))
        info["queue_ms"] = info.get("queue_ms", 0.0) + h.queue_ms
        info["exec_ms"] = info.get("exec_ms", 0.0) + h.exec_ms
        info["wire_bytes"] = info.get("wire_bytes", 0.0) + len(payload)
        self.last_reply = time.monotonic()
        base = sum(s.inputs.profile.edge_ms[start:end])
        if clean:  # a reply that queued behind upload chunks says nothing about the link
            nbytes, wire_ms = len(payload) + y.nbytes, rt_ms - h.queue_ms - h.exec_ms
            s.observe(lambda e: e.observe_round_trip(nbytes, wire_ms))
        s.observe(lambda e: e.observe_reply(h.exec_ms, base, h.queue_ms))
        return y
