"""Queries: the plan for each one, the device's segments on TFLite, the edge's segments over
MQTT, and the pending replies.

``QueryRunner.query`` runs on the caller's thread (TFLite runs there, off the loop). It plans
from frozen snapshots (a hop into the loop only to explore when the plan is local), posts each
edge segment's deadline to the loop, publishes it and waits on its slot in ``Answers``. The
edge's result answers the caller straight from paho's network thread (one thread handoff, as
few as a broker client allows); the loop owns the deadlines and the learning. A reply, its
deadline, an edge going offline and ``close`` all answer through ``Answers``, so each query
gets exactly one answer and a late one is counted once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from device_agent.answers import Answers
from device_agent.edge_session import EdgeSession
from iotoffload.loop import AgentLoop, LoopClosedError
from iotoffload.model.package import ModelPackage
from iotoffload.model.preprocess import normalize_pixels
from iotoffload.planning import Estimates, Plan, Planner, PlanningInputs, single_split_plan
from iotoffload.runtime.base import Array
from iotoffload.runtime.tflite import TFLiteExecutor
from iotoffload.transport.frame import (
    Error,
    ErrorCode,
    Pixels,
    Query,
    Result,
    encode_tensor_frame,
    tensor_of,
)
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)
# what an edge that cannot take a pixel query answers it with
_NO_PIXELS = frozenset({ErrorCode.INVALID_HEADER, ErrorCode.BAD_TENSOR})

SETTLE_WAIT_S = 0.5  # at most, for the loop to learn from the caller's last reply
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
    # of which ONNX Runtime itself ran the blocks (the rest: the edge's worker handoff)
    edge_compute_ms: float | None = None
    wire_bytes: int = 0
    # about how long its tensor waited behind upload chunks already on the link (estimated
    # from the bytes unacked at its publish; None: nothing was ahead, or it ran locally)
    behind_upload_ms: float | None = None
    plan: str = ""
    predicted_ms: float = 0.0
    edge: str | None = None  # the edge that ran the offloaded part


@dataclass
class _Pending:
    session: EdgeSession
    timer: asyncio.TimerHandle
    deadline_ms: float
    clean: bool  # no upload chunk was ahead of the query on the link
    start: int = 0
    end: int = 0
    sent_bytes: int = 0
    t_send: float = 0.0  # perf_counter() just before the publish
    # set once the query is finished on the loop (and its reply learned from): the caller's
    # next plan waits for it, so it sees every reply its caller got
    settled: concurrent.futures.Future[None] | None = None


def _settle(f: concurrent.futures.Future[None] | None) -> None:
    if f is not None and not f.done():
        f.set_result(None)


class PendingReplies:
    """Requests waiting for an edge: their deadlines, sessions and what to learn from their
    replies. Owned by the device agent's loop. Their answers go through ``answers`` (any
    thread), so a result reaches its caller straight from the network thread; the loop hears
    of it next (``on_result``) and learns from it."""

    def __init__(
        self,
        answers: Answers[Reply] | None = None,
        on_miss: Callable[[], None] = lambda: None,
        learn: Callable[[_Pending, Result, float], None] = lambda _p, _h, _t: None,
    ) -> None:
        self.answers: Answers[Reply] = answers if answers is not None else Answers()
        self._pending: dict[str, _Pending] = {}
        # answered before their registration reached the loop (the caller posts it after
        # the publish): (reply, arrival). Only answers that won a slot land here, and each
        # such slot's registration is on its way, so this stays as small as the queries in
        # flight.
        self._early: dict[str, tuple[Result | None, float]] = {}
        self._on_miss = on_miss
        self._learn = learn  # (pending, reply, perf_counter() at its arrival)
        self._closed = False
        self.late_answers = 0  # results that came after their query was answered otherwise

    def __len__(self) -> int:
        return len(self._pending)

    def add(
        self,
        rid: str,
        s: EdgeSession,
        deadline_ms: float,
        what: tuple[int, int, int, float] = (0, 0, 0, 0.0),
        settled: concurrent.futures.Future[None] | None = None,
        hold: object | None = None,
    ) -> None:
        """``rid`` (opened in ``answers``, sent to ``s``) waits for a reply or its deadline,
        whichever first. ``what``: (start, end, bytes sent, send time), for learning;
        ``settled`` is set once the query is finished here.

        It is posted after the publish, so its answer may be in already (``_early``): then
        it is finished at once, and learned from."""
        if self._closed:  # answered "agent closed" by the registry
            s.release(hold)
            _settle(settled)
            return
        timer = asyncio.get_running_loop().call_later(deadline_ms / 1e3, self._expire, rid)
        p = _Pending(s, timer, deadline_ms, s.query_started(hold), *what, settled=settled)
        self._pending[rid] = p
        early = self._early.pop(rid, None)
        if early is not None:
            self._finish(rid, *early)

    def _finish(self, rid: str, reply: Result | None = None, arrived: float = 0.0) -> None:
        """The query is done: its deadline cleared, its session told, what its ``reply``
        says learned; then its caller's next plan may go ahead."""
        p = self._pending.pop(rid, None)
        if p is None:  # answered before its registration came: finished when it does
            self._early[rid] = (reply, arrived)
            return
        p.timer.cancel()
        p.session.query_done()
        try:
            if reply is not None:
                self._learn(p, reply, arrived)
        finally:
            _settle(p.settled)

    def _expire(self, rid: str) -> None:
        p = self._pending.get(rid)
        if p is None:
            return
        s = p.session
        if not self.resolve(rid, "deadline passed" if s.online else "edge went offline"):
            return  # its result won the race; its on_result is on the way
        if s.online:
            s.observe(lambda e: e.observe_timeout(p.deadline_ms))
            s.misses.append(time.monotonic())
            self._on_miss()

    def resolve(self, rid: str, value: Reply) -> bool:
        """Answer ``rid`` with ``value``; False when it has its answer already."""
        if not self.answers.answer(rid, value):
            return False
        self._finish(rid)
        return True

    def on_result(self, h: Result, won: bool, arrived: float) -> None:
        """A result reached ``answers`` (``won``: it answered its query) at ``arrived``."""
        if not won:
            self.late_answers += 1  # ignored: the query already has its one answer
            return
        self._finish(h.request_id, h, arrived)

    def on_error(self, h: Error) -> bool:
        """True when the error answered a pending query. ``busy``: the query finishes
        locally and the edge's queueing estimate rises toward its retry hint, so the next
        plans lean on the device until the edge has room."""
        if h.request_id is None:
            return False
        p = self._pending.get(h.request_id)
        if not self.resolve(h.request_id, h):
            return False
        if p is not None and h.code == ErrorCode.BUSY:
            wait = h.retry_ms if h.retry_ms is not None else p.deadline_ms
            p.session.observe(lambda e: e.observe_busy(wait))
        return True

    def release(self, edge: str) -> None:
        """An edge went offline: queries waiting on it finish locally at once."""
        for rid in [r for r, p in self._pending.items() if p.session.edge_id == edge]:
            self.resolve(rid, "edge went offline")

    def close(self) -> None:
        """The agent closes: every waiting query, and any opened later, finishes locally."""
        self._closed = True
        self.answers.close("agent closed")
        for rid in list(self._pending):
            self._finish(rid)
        self._early.clear()


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
        self.pending = PendingReplies(Answers(), on_miss, self._learn)
        self._ids = itertools.count()
        self._caller = threading.local()  # per caller thread: its last query's ``settled``
        self._pixels = self._pixel_spec(pkg)  # set once, here: read by any caller thread
        self.last_reply = time.monotonic()
        self.last_query = 0.0

    # planning (pure reads of frozen snapshots, plus the loop-owned clocks) -----------------
    def plan_for(self, s: EdgeSession, inputs: PlanningInputs | None = None) -> Plan:
        """The plan for the next query on edge ``s``, over the blocks it holds now
        (``inputs``: the session's, or those of a pixel query)."""
        inputs = inputs or s.inputs
        if self.fixed_split is not None:  # missing blocks make it finish locally, saying so
            return single_split_plan(inputs, max(self.fixed_split, inputs.min_local))
        return self.planner.plan(inputs, s.stored)

    def pixels_of(self, x: Array) -> Pixels | None:
        """How the edge normalises ``x`` when it is the uint8 pixels of an image for this
        float32 model (``preprocess.pil_pixels``); None when ``x`` is the input itself."""
        m = self.pkg.manifest
        if x.dtype != np.uint8 or m.input.dtype != "float32":
            return None
        if self._pixels is None:
            raise ValueError(
                f"model {m.name} records no image preprocessing: give its float32 input, "
                "not uint8 pixels"
            )
        if tuple(x.shape) != tuple(m.input.shape):
            raise ValueError(f"pixels of shape {list(x.shape)}; the model takes {m.input.shape}")
        if isinstance(self._pixels, str):
            raise ValueError(self._pixels)
        return self._pixels

    @staticmethod
    def _pixel_spec(pkg: ModelPackage) -> Pixels | str | None:
        """The package's Pixels (validated once, not per query), why it has none (a mean or
        std no frame may carry, std 0 say), or None without image preprocessing."""
        m = pkg.manifest
        if m.preprocessing is None or m.input.layout not in ("NHWC", "NCHW"):
            return None
        prep = m.preprocessing
        try:
            return Pixels(mean=list(prep.mean), std=list(prep.std), layout=m.input.layout)
        except ValidationError as e:
            return f"model {m.name}: its preprocessing cannot normalise pixels: {e}"

    @staticmethod
    def pixel_inputs(s: EdgeSession, x: Array) -> PlanningInputs:
        """The session's planning inputs for a query of pixels ``x``: block 0's input
        crosses the link as its uint8 bytes, when the edge takes them."""
        inputs = s.inputs
        if s.pixels_refused:
            return inputs
        prof = inputs.profile
        wire = (x.nbytes, *prof.boundary_bytes[1:])
        return dataclasses.replace(inputs, profile=dataclasses.replace(prof, boundary_bytes=wire))

    def auto_deadline_ms(self, s: EdgeSession, start: int, predicted_ms: float = 0.0) -> float:
        """Wait for the edge about twice what finishing locally from ``start`` would take (or
        the plan's prediction, whichever is larger)."""
        local = sum(s.inputs.profile.device_ms[start:]) * s.inputs.estimates.device_scale
        return max(100.0, 2.0 * max(local, predicted_ms) + 50.0)

    def exploration(
        self, s: EdgeSession, local: Plan, inputs: PlanningInputs | None = None
    ) -> Plan | None:
        """The best single-split offloading plan over the blocks ``s`` holds, when no reply
        refreshed the estimates for ``explore_s`` and it is predicted close to ``local``."""
        if self.explore_s is None or self.fixed_split is not None or self.planner.name == "local":
            return None
        inputs = inputs or s.inputs
        if inputs.objective != "latency":  # the comparison below is in milliseconds
            return None
        if time.monotonic() - self.last_reply < self.explore_s or not s.online:
            return None
        n, stored = self.pkg.num_blocks, s.stored
        options = [
            single_split_plan(inputs, k)
            for k in range(inputs.min_local, n)
            if all(i in stored for i in range(k, n))
        ]
        best = min(options, key=lambda p: p.latency_ms, default=None)
        if best is None or best.latency_ms > local.latency_ms * (1 + self.explore_margin):
            return None
        self.last_reply = time.monotonic()  # one exploring query per period, answered or not
        return best

    def _plan(
        self, s: EdgeSession, split: int | None, inputs: PlanningInputs | None = None
    ) -> tuple[Plan, str]:
        """(plan, reason) for one query, from frozen snapshots (any thread)."""
        inputs = inputs or s.inputs
        plan = single_split_plan(inputs, split) if split is not None else self.plan_for(s, inputs)
        return plan, "planned local" if not plan.offloads else "edge"

    def _explore(
        self, s: EdgeSession, plan: Plan, inputs: PlanningInputs | None = None
    ) -> tuple[Plan, str] | None:
        """On the loop (it owns the clocks): mark the query; an exploring plan, if due."""
        self.last_query = time.monotonic()
        explore = self.exploration(s, plan, inputs)
        return None if explore is None else (explore, "explore")

    def _register(
        self,
        rid: str,
        s: EdgeSession,
        deadline: float,
        what: tuple[int, int, int, float],
        settled: concurrent.futures.Future[None],
        hold: object | None = None,
    ) -> None:
        """On the loop: the query is on its way; its reply or its deadline, whichever first."""
        self.last_query = time.monotonic()
        self.pending.add(rid, s, deadline, what, settled, hold)

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
        edge offline) is finished on the device. Exactly one answer, always.

        ``x`` is the model's input, or the uint8 pixels of an image (``pixels_of``): they
        are normalised where block 0 runs, the edge's side included."""
        n = self.pkg.num_blocks
        px = self.pixels_of(x)
        self.settle()
        s = self._current()  # a move during this query affects the next one
        loop = self._loop()
        inputs = self.pixel_inputs(s, x) if px is not None else None
        plan, reason = self._plan(s, split, inputs)  # snapshots: no hop into the loop
        if loop is not None and split is None and not plan.offloads:
            try:  # planned local: maybe explore (one hop; local work dwarfs it)
                explored = loop.call(lambda: self._explore(s, plan, inputs))
            except LoopClosedError:
                explored, loop = None, None
            if explored is not None:
                plan, reason = explored
        # an offloaded query marks itself when its pending reply is registered (one post)
        t0 = time.perf_counter()
        hold = self._announce_tensor(loop, s, plan, t0) if loop is not None else None
        y = x

        def floats(y: Array) -> Array:  # block 0's input, from pixels if that is what y is
            if px is None or y is not x:
                return y
            # into this thread's buffer: a fresh 600 KB array per query cost the slowed
            # device page faults; TFLite and the encoder copy it, nothing keeps it
            buf: Array | None = getattr(self._caller, "pixel_floats", None)
            if buf is None or buf.shape != x.shape:
                buf = self._caller.pixel_floats = np.empty(x.shape, np.float32)
            return normalize_pixels(x, px.mean, px.std, px.layout, out=buf)

        front_ms = 0.0
        offloaded = False
        info: dict[str, float] = {}
        ran_ms = profiled_ms = 0.0  # the device's own blocks: how fast it runs them now
        sessions = self.tfl.num_loaded  # a block's first run makes its interpreter first
        for seg in plan.segments:
            if seg.where == "device":
                y, times = self.tfl.run_timed(seg.start, seg.end, floats(y))
                ran_ms += sum(times) * 1e3
                profiled_ms += sum(s.inputs.profile.device_ms[seg.start : seg.end])
                if not offloaded:
                    front_ms += sum(times) * 1e3
                continue
            why = self.why_not_remote(s, seg.start, seg.end) if loop else "broker unreachable"
            got: Array | str = why
            if not why and loop is not None:
                send = px if y is x and not s.pixels_refused else None
                got = self._run_remote(
                    loop,
                    s,
                    seg.start,
                    seg.end,
                    y if send is not None else floats(y),
                    plan.latency_ms,
                    info,
                    hold,
                    send,
                )
                hold = None  # released once its tensor is published (or it failed)
            if isinstance(got, str):
                reason = got
                y = self.tfl.run(seg.start, n, floats(y))  # finish on the device
                break
            y, offloaded = got, True
        if loop is not None and hold is not None:  # no tensor came after all: stop holding
            loop.post(s.release, hold)
        latency_ms = (time.perf_counter() - t0) * 1e3
        if loop is not None and profiled_ms > 0:  # the loop owns the estimates
            loop.post(s.observe, lambda e: e.observe_device(ran_ms, profiled_ms))
            # all of a local plan's latency is the device's: what runs around its blocks is
            # part of its cost (not an interpreter made on a block's first run, though)
            if not plan.offloads and self.tfl.num_loaded == sessions:
                outside = latency_ms - ran_ms
                loop.post(s.observe, lambda e: e.observe_overhead(outside, ran_ms))
        out = QueryOutcome(
            index,
            y,
            latency_ms,
            plan.split,
            offloaded,
            reason,
            front_ms,
        )
        out.plan, out.predicted_ms = plan.describe(), plan.latency_ms
        out.edge = s.edge_id if offloaded else None
        out.edge_queue_ms = info.get("queue_ms")
        out.edge_exec_ms = info.get("exec_ms")
        out.edge_compute_ms = info.get("compute_ms")
        out.wire_bytes = int(info.get("wire_bytes", 0))
        out.behind_upload_ms = info.get("behind_upload_ms")
        return out

    def _announce_tensor(
        self, loop: AgentLoop, s: EdgeSession, plan: Plan, t0: float
    ) -> object | None:
        """Tell the upload when this query's tensor will be published (after its device
        blocks, as predicted), so no chunk is still on the link then: the query goes first
        without the upload stopping for it. The hold's token, or None (nothing to hold for:
        a local plan, blocks the edge lacks, or a tensor published at once)."""
        first = next((seg for seg in plan.segments if seg.where == "edge"), None)
        if first is None or self.why_not_remote(s, first.start, first.end):
            return None
        front_s = sum(s.inputs.profile.device_ms[: first.start])
        front_s *= s.inputs.estimates.device_scale / 1e3
        if front_s <= 0:
            return None
        hold = object()
        loop.post(s.expect_query, hold, t0 + 0.9 * front_s, t0 + 1.5 * front_s + 0.02)
        return hold

    def settle(self) -> None:
        """Wait (briefly: the loop does it as the reply arrives) until the estimates have
        learned from this thread's last reply, so a plan (or a read of the estimates) on this
        thread sees it. A result reaches its
        caller before the loop learns from it; that is the price of one handoff fewer."""
        settled: concurrent.futures.Future[None] | None = getattr(self._caller, "settled", None)
        if settled is not None:
            self._caller.settled = None
            with contextlib.suppress(concurrent.futures.TimeoutError):
                settled.result(SETTLE_WAIT_S)

    def _run_remote(
        self,
        loop: AgentLoop,
        s: EdgeSession,
        start: int,
        end: int,
        x: Array,
        predicted_ms: float,
        info: dict[str, float],
        hold: object | None = None,
        pixels: Pixels | None = None,
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
            pixels=pixels,
        )
        return self._remote(
            loop, s, start, end, rid, payload, deadline, info, hold, pixels is not None
        )

    def _remote(
        self,
        loop: AgentLoop,
        s: EdgeSession,
        start: int,
        end: int,
        rid: str,
        payload: bytes,
        deadline: float,
        info: dict[str, float],
        hold: object | None = None,
        pixels: bool = False,
    ) -> Array | str:
        """Run [start, end) on edge ``s`` (caller's thread): the output, or why not
        (``pixels``: the payload is a pixel query).

        The query's slot in ``answers`` is opened *before* the publish, so it is in place when
        the reply comes; its deadline is registered on the loop (a post) right after. The
        result answers the caller straight from the network thread; the loop answers a
        deadline, an edge going offline or the agent closing. Whichever is first is the one
        answer."""
        answers = self.pending.answers
        out = self.pkg.manifest.blocks[end - 1].output
        fut = answers.open(rid, s.edge_id, (out.dtype, tuple(out.shape)))
        if fut.done():  # the agent has closed
            if hold is not None:
                loop.post(s.release, hold)
            return str(fut.result())
        behind = s.behind_upload_ms()  # a snapshot read: what is ahead of this tensor
        if behind is not None:
            info["behind_upload_ms"] = max(info.get("behind_upload_ms", 0.0), behind)
        t_send = time.perf_counter()
        settled: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._caller.settled = settled  # this thread's next plan waits for it
        s.link.publish(
            self.topics.edge_query(s.edge_id, self.device_id), payload, expiry_s=deadline / 1e3
        )
        # registered after the publish, so the loop's wake-up does not compete with the
        # query's way out (0.2-0.3 ms on loopback); an answer that overtakes it waits for it
        what = (start, end, len(payload), t_send)
        loop.post(self._register, rid, s, deadline, what, settled, hold)
        try:  # the loop answers by the deadline; the margin covers a loop that went away
            reply = fut.result(deadline / 1e3 + 5.0)
        except concurrent.futures.TimeoutError:
            reply = "agent closed" if answers.answer(rid, "agent closed") else fut.result(0)
        if isinstance(reply, Error):
            if pixels and reply.code in _NO_PIXELS:
                # an edge that predates pixel queries refuses the header: float32 from now
                # on (this query finishes on the device, as any refused one does)
                loop.post(s.refuse_pixels)
            return f"edge error: {reply.code}"
        if isinstance(reply, str):
            return reply
        h, body = reply
        y = np.array(tensor_of(h, body))
        info["queue_ms"] = info.get("queue_ms", 0.0) + h.queue_ms
        info["exec_ms"] = info.get("exec_ms", 0.0) + h.exec_ms
        info["compute_ms"] = info.get("compute_ms", 0.0) + sum(h.block_ms)
        info["wire_bytes"] = info.get("wire_bytes", 0.0) + len(payload)
        return y

    def _learn(self, p: _Pending, h: Result, arrived: float) -> None:
        """On the loop, right after a reply in time answered its query: keep the estimates
        fresh from the reply itself (LoADPart). The caller's next plan waits for this
        (``settle``), so it sees the reply."""
        self.last_reply = time.monotonic()
        s = p.session
        base = sum(s.inputs.profile.edge_ms[p.start : p.end])
        nbytes = p.sent_bytes + h.tensor.nbytes
        wire_ms = (arrived - p.t_send) * 1e3 - h.queue_ms - h.exec_ms

        def learn(e: Estimates) -> Estimates:  # one new snapshot per reply
            if p.clean:  # a reply that queued behind upload chunks says nothing of the link
                e = e.observe_round_trip(nbytes, wire_ms)
            return e.observe_reply(h.exec_ms, base, h.queue_ms)

        s.observe(learn)
