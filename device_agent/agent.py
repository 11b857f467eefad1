"""The device agent: uploads its model's blocks to an edge and offloads queries meanwhile;
moves between edges (handoff) without losing a query."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from device_agent.candidates import Candidates
from device_agent.edge_session import EdgeSession, Progress, fresh_estimates
from device_agent.handoff import EdgeView, HandoffPolicy
from iotoffload.discovery import EdgeRecord, EdgeWatcher
from iotoffload.model.package import ModelPackage
from iotoffload.planning import (
    Estimates,
    Objective,
    Plan,
    PlanningInputs,
    chain_profile,
    make_planner,
    measure_device_ms,
    single_split_plan,
)
from iotoffload.runtime.base import Array
from iotoffload.runtime.tflite import TFLiteExecutor
from iotoffload.transport.frame import (
    Error,
    FrameError,
    Inventory,
    Query,
    Result,
    UploadAck,
    decode,
    encode_tensor_frame,
    tensor_of,
)
from iotoffload.transport.mqtt import BrokerUnavailableError, BrokerURL, MqttLink
from iotoffload.transport.topics import Topics, check_id

log = logging.getLogger(__name__)
DEFAULT_CHUNK = 256 * 1024  # well under mosquitto 2.1's 2 MB and EMQX's 1 MB packet caps


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
    event: threading.Event = field(default_factory=threading.Event)
    result: tuple[Result, memoryview] | None = None
    error: Error | None = None
    edge: str = ""


@dataclass(frozen=True)
class HandoffEvent:
    at: float  # time.monotonic()
    source: str
    target: str
    reason: str
    target_had: int  # blocks the new edge already held
    transfer: int  # blocks asked from the old edge over the backhaul


class DeviceAgent:
    def __init__(
        self,
        pkg: ModelPackage,
        broker_url: str,
        edge_id: str,
        *,
        device_id: str | None = None,
        split: int | None = None,
        protocol: int = 5,
        prefix: str = "iotoffload/v1",
        chunk_size: int = DEFAULT_CHUNK,
        deadline_ms: float | None = None,
        tflite_threads: int = 1,
        planner: str = "auto",
        objective: Objective = "latency",
        min_local: int = 0,
        edge_speed: float = 1.0,
        device_ms: list[float] | None = None,
        estimates: Estimates | None = None,
        reprofile: bool = False,
        handoff: HandoffPolicy | None = None,
        interface: str | None = None,
        prefer: str | None = None,
        transfer: bool = True,
        proactive: bool = False,
        proactive_rate_Bps: float = 1e6,  # noqa: N803
        upload_rate_Bps: float | None = None,  # noqa: N803
        probe_interval: float = 2.0,
        peer_stall_s: float = 3.0,
        explore_s: float | None = 5.0,
        explore_margin: float = 0.25,
    ) -> None:
        """``handoff``: the move policy (None: never move on its own; ``move_to`` and
        ``prefer`` still work). ``interface``: watch zeroconf there for more edges.
        ``transfer``: at a move, have the new edge fetch blocks from the old one.
        ``proactive``: once the current edge has the model, fill the likely next edge in the
        background (by transfer, or at ``proactive_rate_Bps`` from the device).
        ``upload_rate_Bps``: cap the device's own upload (leaves the link to queries)."""
        self.pkg = pkg
        self.device_id = check_id("device", device_id or f"dev-{uuid.uuid4().hex[:8]}")
        n = pkg.num_blocks
        if split is not None and not 0 <= split <= n:
            raise ValueError(f"split must be within 0..{n}")
        if not 0 <= min_local <= n:
            raise ValueError(f"min_local must be within 0..{n}")
        self.fixed_split = split  # a fixed split overrides the planner's per-query choice
        self.topics = Topics(prefix)
        self.protocol = protocol
        self.chunk_size = chunk_size
        self.tfl = TFLiteExecutor.from_package(pkg, threads=tflite_threads)
        self.planner = make_planner(planner)
        d = device_ms or measure_device_ms(pkg, self.tfl, reprofile=reprofile)
        self._base_inputs = PlanningInputs(
            chain_profile(pkg, d, edge_speed=edge_speed),
            estimates or Estimates(),
            objective=objective,
            min_local=min_local,
        )
        self.policy = handoff
        self.interface = interface
        self.prefer = check_id("edge", prefer) if prefer else None
        self.transfer = transfer
        self.proactive = proactive
        self.proactive_rate_Bps = proactive_rate_Bps
        self.upload_rate_Bps = upload_rate_Bps
        self.probe_interval = probe_interval
        self.peer_stall_s = peer_stall_s  # a transfer without progress this long: upload myself
        # Estimates come from replies: a device that went local gets none and could stay local
        # on a stale (e.g. upload-depressed) bandwidth estimate. So every ``explore_s`` it sends
        # one query by the best offloading plan when that is predicted within ``explore_margin``
        # of the local plan (None: never explore).
        self.explore_s = explore_s
        self.explore_margin = explore_margin
        self._last_reply = time.monotonic()
        self.candidates = Candidates()
        self.handoffs: list[HandoffEvent] = []
        self._links: dict[str, MqttLink] = {}
        self.sessions: dict[str, EdgeSession] = {}
        self._lock = threading.Lock()
        self._move_lock = threading.Lock()
        self._upload_lock = threading.Lock()
        url = str(BrokerURL.parse(broker_url))
        self.candidates.seen(check_id("edge", edge_id), url, "config")
        self.session = self._new_session(edge_id, url, self._base_inputs)
        self.split = split if split is not None else self._predicted_split()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self.deadline_ms = deadline_ms
        self._upload_thread: threading.Thread | None = None
        self._uploading = False
        self._upload_active = False
        self._upload_progress: Progress | None = None
        self._proactive_target: str | None = None
        self._last_query = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watcher: EdgeWatcher | None = None
        self._monitor: threading.Thread | None = None
        self.late_answers = 0  # results that came after their query was answered otherwise

    # the current edge (compatible accessors) ------------------------------------------------
    @property
    def edge_id(self) -> str:
        return self.session.edge_id

    @property
    def link(self) -> MqttLink:
        return self.session.link

    @property
    def inputs(self) -> PlanningInputs:
        return self.session.inputs

    @property
    def edge_online(self) -> bool:
        return self.session.online

    @property
    def inventory(self) -> Inventory:
        return self.session.inventory

    @property
    def bytes_uploaded(self) -> int:
        """Bytes of blocks this device sent, to every edge."""
        return sum(s.bytes_uploaded for s in list(self.sessions.values()))

    @property
    def upload_errors(self) -> list[str]:
        return [e for s in list(self.sessions.values()) for e in s.upload_errors]

    @property
    def chunks_sent(self) -> dict[int, int]:
        return self.session.chunks_sent

    @property
    def resumed_blocks(self) -> list[int]:
        return self.session.resumed_blocks

    def _predicted_split(self) -> int:
        """Where the planner would cut with every block on the edge (for display)."""
        return self.planner.plan(self.inputs, frozenset(range(self.pkg.num_blocks))).split

    def auto_deadline_ms(self, start: int, predicted_ms: float = 0.0) -> float:
        """Wait for the edge about twice what finishing locally from ``start`` would take (or
        the plan's prediction, whichever is larger)."""
        local = sum(self.inputs.profile.device_ms[start:])
        return max(100.0, 2.0 * max(local, predicted_ms) + 50.0)

    def plan_for(self, s: EdgeSession) -> Plan:
        """The plan for the next query on edge ``s``, over the blocks it holds now."""
        if self.fixed_split is not None:  # missing blocks make it finish locally, saying so
            return single_split_plan(s.inputs, max(self.fixed_split, s.inputs.min_local))
        return self.planner.plan(s.inputs, s.stored)

    def current_plan(self) -> Plan:
        return self.plan_for(self.session)

    # links and sessions ---------------------------------------------------------------------
    def _link_for(self, url: str) -> MqttLink:
        """One connection per broker; each carries my inbox, my control topic and every edge's
        status on that broker."""
        link = self._links.get(url)
        if link is None:
            link = MqttLink(url, f"device-{self.device_id}", protocol=self.protocol)
            link.subscribe(self.topics.device_inbox(self.device_id), self._on_inbox)
            link.subscribe(self.topics.edge_status_all(), self._on_status)
            link.subscribe(self.topics.device_control(self.device_id), self._on_control)
            link.on_reconnect.append(lambda: self._after_reconnect(link))
            self._links[url] = link
        return link

    def _new_session(self, edge_id: str, url: str, inputs: PlanningInputs) -> EdgeSession:
        s = EdgeSession(
            edge_id,
            url,
            self._link_for(url),
            pkg=self.pkg,
            device_id=self.device_id,
            topics=self.topics,
            inputs=inputs,
            chunk_size=self.chunk_size,
            peer_stall_s=self.peer_stall_s,
        )
        self.sessions[edge_id] = s
        return s

    def _session_for(self, edge_id: str) -> EdgeSession | None:
        """The session with ``edge_id``, made (and its broker connected) when first needed."""
        s = self.sessions.get(edge_id)
        if s is not None:
            return s
        c = self.candidates.get(edge_id)
        if c is None:
            return None
        link = self._link_for(c.broker)
        if not link.connected:
            try:
                link.connect(5.0)
            except BrokerUnavailableError as e:
                log.warning("edge %s: %s", edge_id, e)
                self._links.pop(c.broker, None)
                return None
        est = fresh_estimates(self.session.inputs.estimates)
        return self._new_session(
            edge_id, c.broker, dataclasses.replace(self._base_inputs, estimates=est)
        )

    def _after_reconnect(self, link: MqttLink) -> None:
        for s in list(self.sessions.values()):
            if s.link is link and s.announced:
                s.after_reconnect()

    # connection -----------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> Inventory | None:
        self.link.connect(timeout)
        inv = self.session.announce(timeout)
        if self.interface:
            self._watcher = EdgeWatcher(self.interface, self._on_zeroconf, self._on_zeroconf_gone)
            self._watcher.start()
        self._monitor = threading.Thread(target=self._monitor_loop, name="handoff", daemon=True)
        self._monitor.start()
        return inv

    def probe(self, timeout: float = 2.0) -> float | None:
        """One light RTT probe (hello → inventory); also refreshes the edge's inventory."""
        return self.session.probe(timeout)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._watcher:
            self._watcher.close()
        if self._monitor:
            self._monitor.join(5)
        for link in list(self._links.values()):
            link.close()

    # handoff --------------------------------------------------------------------------------
    def add_edge(self, edge: str, broker: str) -> None:
        """Make an edge known without discovery (configured, or from another app)."""
        self.candidates.seen(check_id("edge", edge), broker, "config")
        self._wake.set()

    def set_prefer(self, edge: str | None) -> None:
        """Force the device onto ``edge`` whenever it is online (None: the policy decides)."""
        self.prefer = check_id("edge", edge) if edge else None
        self._wake.set()

    def _views(self, now: float) -> tuple[EdgeView, list[EdgeView]]:
        def view(s: EdgeSession) -> EdgeView:
            c = self.candidates.get(s.edge_id)
            online = s.online and s.link.connected and (c is None or c.online)
            # what the next query would cost with this edge: never worse than running it all
            # locally (a fixed split the edge cannot serve yet runs locally, too)
            plan = self.plan_for(s)
            ms = single_split_plan(s.inputs, self.pkg.num_blocks).latency_ms
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

        cur = self.session
        others = [
            view(s) for s in list(self.sessions.values()) if s is not cur and s.inventory_seen
        ]
        return view(cur), others

    def _monitor_loop(self, tick: float = 0.25) -> None:
        last_probe = 0.0
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                now = time.monotonic()
                if now - last_probe >= self.probe_interval:
                    last_probe = now
                    self._probe_all(now)
                self._maybe_move(now)
                if self.proactive:
                    self._maybe_proactive()
            except Exception:  # the monitor must outlive any one bad round
                log.exception("handoff monitor round failed")

    def _probe_all(self, now: float) -> None:
        """Keep every candidate fresh: RTT and inventory by a hello. The current edge is
        probed only when idle (replies to queries keep its estimates fresh)."""
        for c in self.candidates.all():
            if not c.online or (
                c.id == self.edge_id and now - self._last_query < self.probe_interval
            ):
                continue
            s = self._session_for(c.id)
            if s is not None and s.link.connected:
                s.hello()

    def _maybe_move(self, now: float) -> None:
        cur, others = self._views(now)
        if self.policy is None:  # forced moves work without a policy
            want = self.prefer
            if want and want != cur.id and any(v.id == want and v.online for v in others):
                self.move_to(want, "preferred")
            return
        move = self.policy.decide(cur, others, prefer=self.prefer, now=now)
        if move is not None:
            self.move_to(move.target, move.reason)

    def move_to(self, edge_id: str, reason: str = "requested", timeout: float = 3.0) -> bool:
        """Make ``edge_id`` the current edge. Queries in flight finish on the old edge (or
        locally); the new session starts from the blocks the new edge holds; the rest come from
        the old edge over the backhaul (``transfer``) or from this device."""
        with self._move_lock:
            old = self.session
            if old.edge_id == edge_id:
                return True
            new = self._session_for(edge_id)
            if new is None:
                log.warning("cannot move to %s: unknown or unreachable", edge_id)
                return False
            inv = new.announce(timeout)
            if inv is None:
                return False
            want = [i for i in self.upload_order() if i not in new.stored]
            asked: list[int] = []
            reachable = old.online and old.link.connected and not old.recent_misses()
            if self.transfer and want and reachable:
                asked = [i for i in want if i in old.stored]
                if asked:
                    new.request_transfer(old, asked)
            with self._lock:
                self.session = new
            if self._proactive_target == edge_id:  # done: the next edge may be filled later
                self._proactive_target = None
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
        if self._uploading and want:
            self._ensure_uploader()
        return True

    def _maybe_proactive(self) -> None:
        """Fill the likely next edge (the best other online one) once the current is full."""
        cur = self.session
        if not cur.upload_complete or self._proactive_target is not None:
            return
        _, others = self._views(time.monotonic())
        best = HandoffPolicy._best(others)
        if best is None:
            return
        self._proactive_target = best.id
        threading.Thread(
            target=self._proactive_fill, args=(best.id,), name="proactive", daemon=True
        ).start()

    def _proactive_fill(self, edge_id: str) -> None:
        s = self.sessions[edge_id]
        if s.announce(3.0) is None:
            self._proactive_target = None
            return
        cur = self.session
        want = [i for i in self.upload_order() if i not in s.stored]
        if self.transfer and cur is not s and cur.online:
            asked = [i for i in want if i in cur.stored]
            if asked:
                log.info(
                    "proactive: %s fetches %d blocks from %s", edge_id, len(asked), cur.edge_id
                )
                s.request_transfer(cur, asked)
        s.upload(
            want,
            active=lambda: not self._stop.is_set() and self.session is not s,
            rate_Bps=self.proactive_rate_Bps,
        )

    # upload ---------------------------------------------------------------------------------
    def upload_order(self) -> list[int]:
        n = self.pkg.num_blocks
        if self.fixed_split is not None:
            return [*range(self.fixed_split, n), *range(0, self.fixed_split)]
        order = self.planner.upload_order(self.inputs)
        return order + [i for i in range(n) if i not in order]  # the rest, later

    def start_upload(self, progress: Progress | None = None) -> None:
        self._upload_progress = progress
        self._uploading = True
        self._ensure_uploader()

    def _ensure_uploader(self) -> None:
        """After a move: an upload loop that is still running goes on with the new edge
        (it checks the session under the same lock); otherwise start one."""
        with self._lock:
            if self._upload_active:
                return
            self._upload_active = True
            self._upload_thread = threading.Thread(
                target=self.upload, args=(self._upload_progress,), name="uploader", daemon=True
            )
            self._upload_thread.start()

    def wait_upload(self, timeout: float | None = None) -> bool:
        if self._upload_thread:
            self._upload_thread.join(timeout)
            return not self._upload_thread.is_alive()
        return True

    def upload(self, progress: Progress | None = None, *, block_timeout: float = 30.0) -> None:
        """Send the current edge every block it lacks, in upload order; resume partial
        blocks. Follows handoffs: after a move it goes on with the new edge."""
        self._uploading = True
        self._upload_progress = progress
        with self._upload_lock:
            with self._lock:
                self._upload_active = True
            while True:
                s = self.session

                def active(s: EdgeSession = s) -> bool:
                    return self.session is s and not self._stop.is_set()

                if not self._stop.is_set():
                    rate = self.upload_rate_Bps
                    s.upload(
                        self.upload_order(),
                        progress,
                        active=active,
                        rate_Bps=rate,
                        block_timeout=block_timeout,
                    )
                with self._lock:  # the exit decision and a move exclude each other
                    if self._stop.is_set() or self.session is s:
                        self._upload_active = False
                        return

    # queries --------------------------------------------------------------------------------
    def query(self, x: Array, index: int = 0, split: int | None = None) -> QueryOutcome:
        """Run one query by the current plan; an edge segment that fails (deadline, error,
        edge offline) is finished on the device. Exactly one answer, always."""
        n = self.pkg.num_blocks
        s = self.session  # a move during this query affects the next one
        plan = single_split_plan(s.inputs, split) if split is not None else self.plan_for(s)
        explore = None if split is not None or plan.offloads else self._exploration(s, plan)
        t0 = time.perf_counter()
        self._last_query = time.monotonic()
        y = x
        front_ms = 0.0
        offloaded = False
        reason = "planned local" if not plan.offloads else "edge"
        if explore is not None:
            plan, reason = explore, "explore"
        info: dict[str, float] = {}
        for seg in plan.segments:
            if seg.where == "device":
                y, times = self.tfl.run_timed(seg.start, seg.end, y)
                if not offloaded:
                    front_ms += sum(times) * 1e3
                continue
            why = self._why_not_remote(s, seg.start, seg.end)
            got = None if why else self._remote(s, seg.start, seg.end, y, plan.latency_ms, info)
            if isinstance(got, str) or got is None:
                reason = why or str(got)
                y = self.tfl.run(seg.start, n, y)  # finish on the device
                break
            y, offloaded = got, True
        out = QueryOutcome(
            index, y, (time.perf_counter() - t0) * 1e3, plan.split, offloaded, reason, front_ms
        )
        out.plan, out.predicted_ms = plan.describe(), plan.latency_ms
        out.edge = s.edge_id if offloaded else None
        out.edge_queue_ms = info.get("queue_ms")
        out.edge_exec_ms = info.get("exec_ms")
        out.wire_bytes = int(info.get("wire_bytes", 0))
        return out

    def _exploration(self, s: EdgeSession, local: Plan) -> Plan | None:
        """The best single-split offloading plan over the blocks ``s`` holds, when no reply
        refreshed the estimates for ``explore_s`` and it is predicted close to ``local``."""
        if self.explore_s is None or self.fixed_split is not None or self.planner.name == "local":
            return None
        if s.inputs.objective != "latency":  # the comparison below is in milliseconds
            return None
        if time.monotonic() - self._last_reply < self.explore_s or not s.online:
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
        self._last_reply = time.monotonic()  # one exploring query per period, answered or not
        return best

    @staticmethod
    def _why_not_remote(s: EdgeSession, start: int, end: int) -> str:
        if not s.link.connected:
            return "broker unreachable"
        if not s.online:
            return "edge offline"
        if not s.has(start, end):
            return "blocks not uploaded yet"
        return ""

    def _remote(
        self,
        s: EdgeSession,
        start: int,
        end: int,
        x: Array,
        predicted_ms: float,
        info: dict[str, float],
    ) -> Array | str:
        """Run [start, end) on edge ``s``: the output, or why not."""
        rid = f"{self.device_id}-{next(self._ids)}"
        deadline = self.deadline_ms or self.auto_deadline_ms(start, predicted_ms)
        pend = _Pending(edge=s.edge_id)
        with self._lock:
            self._pending[rid] = pend
        payload = encode_tensor_frame(
            Query,
            x,
            request_id=rid,
            device=self.device_id,
            model_id=self.pkg.manifest.model_id,
            start=start,
            end=end,
            deadline_ms=deadline,
        )
        t_send = time.perf_counter()
        clean = s.query_started()
        try:
            s.link.publish(self.topics.edge_query(s.edge_id), payload, expiry_s=deadline / 1e3)
            pend.event.wait(deadline / 1e3)
        finally:
            s.query_done()
        rt_ms = (time.perf_counter() - t_send) * 1e3
        with self._lock:
            self._pending.pop(rid, None)  # from here on, a late answer is ignored
        if pend.result is None:
            if pend.error:
                return f"edge error: {pend.error.code}"
            if not s.online:
                return "edge went offline"
            s.inputs.estimates.observe_timeout(deadline)
            s.misses.append(time.monotonic())
            self._wake.set()
            return "deadline passed"
        h, body = pend.result
        y = np.array(tensor_of(h, body))
        info["queue_ms"] = info.get("queue_ms", 0.0) + h.queue_ms
        info["exec_ms"] = info.get("exec_ms", 0.0) + h.exec_ms
        info["wire_bytes"] = info.get("wire_bytes", 0.0) + len(payload)
        self._last_reply = time.monotonic()
        if clean:  # a reply that queued behind upload chunks says nothing about the link
            self._learn(s, start, end, len(payload) + y.nbytes, rt_ms, h)
        else:
            s.inputs.estimates.observe_reply(
                h.exec_ms, sum(s.inputs.profile.edge_ms[start:end]), h.queue_ms
            )
        return y

    @staticmethod
    def _learn(s: EdgeSession, start: int, end: int, nbytes: int, rt_ms: float, h: Result) -> None:
        """Keep the estimates fresh from the reply itself (LoADPart): no probe traffic."""
        est = s.inputs.estimates
        est.observe_round_trip(nbytes, rt_ms - h.queue_ms - h.exec_ms)
        base = sum(s.inputs.profile.edge_ms[start:end])
        est.observe_reply(h.exec_ms, base, h.queue_ms)

    # frames (network threads) -----------------------------------------------------------------
    def _session_of(self, edge: str | None) -> EdgeSession | None:
        return self.sessions.get(edge) if edge else self.session

    def _on_inbox(self, _t: str, payload: bytes) -> None:
        try:
            h, body = decode(payload)
        except FrameError as e:
            log.warning("bad frame from an edge: %s", e)
            return
        if isinstance(h, Inventory | UploadAck):
            s = self._session_of(h.edge)
            if s is None or h.model_id != self.pkg.manifest.model_id:
                return
            if isinstance(h, Inventory):
                s.on_inventory(h)
            else:
                s.on_ack(h)
        elif isinstance(h, Result | Error):
            rid = h.request_id
            with self._lock:
                pend = self._pending.get(rid) if rid else None
            if pend is None:
                if isinstance(h, Result):
                    self.late_answers += 1  # ignored: the query already has its one answer
                if isinstance(h, Error):
                    log.warning("edge %s error %s: %s", h.edge or "?", h.code, h.message)
                    self._session_error(h)
                return
            if isinstance(h, Result):
                pend.result = (h, body)
            else:
                pend.error = h
            pend.event.set()

    def _session_error(self, h: Error) -> None:
        """An error not tied to a query: an upload refused by an edge, or a block the old
        edge will not push to the edge now fetching it (request id transfer-block:PEER:i)."""
        rid = h.request_id or ""
        if rid.startswith("transfer-block:"):
            target = self.sessions.get(rid.split(":")[1])
            if target is not None and target.peer_source == h.edge:
                target.on_error(h)
            return
        s = self._session_of(h.edge)
        if s is not None:
            s.on_error(h)

    def _on_status(self, _t: str, payload: bytes) -> None:
        c = self.candidates.from_status(payload)
        if c is None:
            return
        s = self.sessions.get(c.id)
        if s is not None:
            s.on_status(c.online, c.queue_ms)
        if not c.online:
            self._release(c.id)
        self._wake.set()

    def _release(self, edge: str) -> None:
        """An edge went offline: queries waiting on it finish locally at once."""
        with self._lock:
            waiting = [p for p in self._pending.values() if p.edge == edge]
        for p in waiting:
            p.event.set()

    def _on_zeroconf(self, rec: EdgeRecord) -> None:
        self.candidates.seen(rec.id, rec.broker, "zeroconf", load=rec.load)
        self._wake.set()

    def _on_zeroconf_gone(self, edge: str) -> None:
        self.candidates.gone(edge)
        s = self.sessions.get(edge)
        if s is not None:
            s.online = False
            self._release(edge)
        self._wake.set()

    def _on_control(self, _t: str, payload: bytes) -> None:
        """{"prefer": "edge-b"} or {"prefer": null}: force (or release) the device's edge."""
        try:
            cmd = json.loads(payload)
            if not isinstance(cmd, dict) or "prefer" not in cmd:
                raise ValueError('expected {"prefer": EDGE or null}')
            self.set_prefer(cmd["prefer"])
        except (ValueError, TypeError) as e:
            log.warning("ignored control message: %s", e)
