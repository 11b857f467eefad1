"""The device agent: uploads its model's blocks to an edge and offloads queries meanwhile;
moves between edges (handoff) without losing a query.

``DeviceAgent`` is a thin facade over parts that each own one concern, all owned by one loop
(``iotoffload.loop.AgentLoop``, thread ``device-<id>``):

- ``Connections`` — one broker connection per URL, opened once;
- ``EdgeSession`` — one per edge: what it holds, its estimates, the upload to it;
- ``QueryRunner`` — plans, device segments, pending replies as futures;
- ``HandoffController`` — candidates, the move policy, moves;
- ``UploadCoordinator`` — the upload (it follows moves) and the proactive fill;
- ``InboundRouter`` — every inbound message, decoded and dispatched on the loop.

paho's and zeroconf's threads only post to the loop; the facade's blocking calls hop into it
and wait there; TFLite runs on the caller's thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from device_agent.candidates import Candidates
from device_agent.connections import Connections
from device_agent.edge_session import EdgeSession, Progress, fresh_estimates
from device_agent.handoff import HandoffPolicy
from device_agent.mobility import HandoffController, HandoffEvent
from device_agent.queries import QueryOutcome, QueryRunner
from device_agent.routing import InboundRouter
from device_agent.uploads import UploadCoordinator
from iotoffload.discovery import EdgeRecord, EdgeWatcher
from iotoffload.ids import check_id
from iotoffload.loop import AgentLoop, LoopClosedError
from iotoffload.model.package import ModelPackage
from iotoffload.planning import (
    Estimates,
    Objective,
    Plan,
    PlanningInputs,
    chain_profile,
    make_planner,
)
from iotoffload.runtime.base import Array
from iotoffload.runtime.profiling import measure_device_ms
from iotoffload.runtime.tflite import TFLiteExecutor
from iotoffload.transport.frame import Inventory
from iotoffload.transport.link import Link
from iotoffload.transport.mqtt import BrokerURL, MqttLink, MqttSecurity
from iotoffload.transport.topics import ANY, DEFAULT_PREFIX, Topics

log = logging.getLogger(__name__)
__all__ = ["DEFAULT_CHUNK", "DeviceAgent", "HandoffEvent", "QueryOutcome"]
# the largest upload chunk (chunks are sized to the link below it): a frame of it stays under
# EMQX's 1 MB and mosquitto 2.1's 2 MB packet caps
# the largest upload chunk (link_chunk sizes them to the link below it): with its frame's
# header it fits the 1 MiB packet cap of EMQX's default configuration
DEFAULT_CHUNK = 960 * 1024
T = TypeVar("T")


class DeviceAgent:
    """The device side. Owned by its caller; its state is owned by its loop (``close()``
    stops both)."""

    def __init__(
        self,
        pkg: ModelPackage,
        broker_url: str,
        edge_id: str,
        *,
        device_id: str | None = None,
        split: int | None = None,
        protocol: int = 5,
        prefix: str = DEFAULT_PREFIX,
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
        security: MqttSecurity | None = None,
        allowed_edges: list[str] | None = None,
        operators: list[str] | None = None,
    ) -> None:
        """``handoff``: the move policy (None: never move on its own; ``move_to`` and
        ``prefer`` still work). ``interface``: watch zeroconf there for more edges.
        ``transfer``: at a move, have the new edge fetch blocks from the old one.
        ``proactive``: once the current edge has the model, fill the likely next edge in the
        background (by transfer, or at ``proactive_rate_Bps`` from the device).
        ``upload_rate_Bps``: cap the device's own upload (leaves the link to queries).
        ``security``: TLS and credentials for every broker (default: ``IOTOFFLOAD_MQTT_*``).
        ``allowed_edges``: the only edges it uses and moves to (None: any the broker lets
        publish a status); ``operators``: who may command it on its control topic (None: any
        the broker lets publish there; the broker's ACL is the boundary)."""
        self.pkg = pkg
        self.security = security if security is not None else MqttSecurity()
        # protocol v2: on a secured broker my id is my identity (the ACL checks it)
        who = device_id or self.security.identity() or f"dev-{uuid.uuid4().hex[:8]}"
        self.device_id = check_id("device", who)
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
        self.interface = interface
        self.prefer = check_id("edge", prefer) if prefer else None
        self._allowed_edges = allowed_edges
        self.operators = None if operators is None or "*" in operators else frozenset(operators)
        self.peer_stall_s = peer_stall_s  # a transfer without progress this long: upload myself
        self._stopping = False
        self._connected = False
        self._watcher: EdgeWatcher | None = None
        self._monitor: concurrent.futures.Future[None] | None = None
        url = str(BrokerURL.parse(broker_url))
        check_id("edge", edge_id)
        if protocol not in (5, 311):
            raise ValueError("protocol must be 5 or 311")
        self._loop = AgentLoop(f"device-{self.device_id}")
        try:
            self._assemble(
                url,
                edge_id,
                handoff,
                split,
                deadline_ms,
                explore_s,
                explore_margin,
                upload_rate_Bps,
                probe_interval,
                transfer,
                proactive,
                proactive_rate_Bps,
            )
        except BaseException:
            self._loop.close()  # a constructor that raises leaves no thread behind
            raise

    def _assemble(
        self,
        url: str,
        edge_id: str,
        handoff: HandoffPolicy | None,
        split: int | None,
        deadline_ms: float | None,
        explore_s: float | None,
        explore_margin: float,
        upload_rate_Bps: float | None,  # noqa: N803
        probe_interval: float,
        transfer: bool,
        proactive: bool,
        proactive_rate_Bps: float,  # noqa: N803
    ) -> None:
        pkg = self.pkg
        self.connections = Connections(self._loop, self._make_link)
        self.router = InboundRouter(self)
        sec = self.security
        tls = sec.uses_tls_settings or sec.username is not None or sec.password_file is not None
        self.candidates = Candidates(self._allowed_edges, require_tls=tls)
        self.candidates.seen(edge_id, url, "config")
        self.sessions: dict[str, EdgeSession] = {}
        self.session = self._new_session(edge_id, url, self._base_inputs)
        self.queries = QueryRunner(
            pkg,
            self.tfl,
            self.planner,
            device_id=self.device_id,
            topics=self.topics,
            fixed_split=split,
            deadline_ms=deadline_ms,
            explore_s=explore_s,
            explore_margin=explore_margin,
            current=lambda: self.session,
            loop=lambda: self._loop,
            on_miss=lambda: self.mobility.wake(),
        )
        self.uploads = UploadCoordinator(
            current=lambda: self.session,
            order=self.upload_order,
            rate_Bps=upload_rate_Bps,
            stopping=lambda: self._stopping,
        )
        self.mobility = HandoffController(
            self,
            self.candidates,
            handoff,
            self._session_for,
            probe_interval=probe_interval,
            transfer=transfer,
            proactive=proactive,
            proactive_rate_Bps=proactive_rate_Bps,
        )
        self.split = split if split is not None else self._predicted_split()

    # the current edge (read from any thread: frozen snapshots) -----------------------------
    @property
    def loop(self) -> AgentLoop:
        return self._loop

    @property
    def edge_id(self) -> str:
        return self.session.edge_id

    @property
    def link(self) -> Link:
        return self.session.link

    @property
    def inputs(self) -> PlanningInputs:
        """The current edge's planning inputs, having learned from every reply this thread
        got."""
        self.queries.settle()
        return self.session.inputs

    @property
    def edge_online(self) -> bool:
        return self.session.online

    @property
    def inventory(self) -> Inventory:
        return self._loop.call(lambda: self.session.inventory)

    @property
    def bytes_uploaded(self) -> int:
        """Bytes of blocks this device sent, to every edge."""
        return sum(s.bytes_uploaded for s in list(self.sessions.values()))

    @property
    def upload_errors(self) -> list[str]:
        return [e for s in list(self.sessions.values()) for e in list(s.upload_errors)]

    @property
    def chunks_sent(self) -> dict[int, int]:
        return dict(self.session.chunks_sent)

    @property
    def resumed_blocks(self) -> list[int]:
        return list(self.session.resumed_blocks)

    @property
    def late_answers(self) -> int:
        return self.queries.pending.late_answers

    @property
    def handoffs(self) -> list[HandoffEvent]:
        return list(self.mobility.handoffs)

    @property
    def policy(self) -> HandoffPolicy | None:
        return self.mobility.policy

    def _predicted_split(self) -> int:
        """Where the planner would cut with every block on the edge (for display)."""
        return self.planner.plan(self.inputs, frozenset(range(self.pkg.num_blocks))).split

    def auto_deadline_ms(self, start: int, predicted_ms: float = 0.0) -> float:
        return self.queries.auto_deadline_ms(self.session, start, predicted_ms)

    def plan_for(self, s: EdgeSession) -> Plan:
        return self.queries.plan_for(s)

    def current_plan(self) -> Plan:
        return self.queries.plan_for(self.session)

    def upload_order(self) -> list[int]:
        n = self.pkg.num_blocks
        if self.fixed_split is not None:
            return [*range(self.fixed_split, n), *range(0, self.fixed_split)]
        order = self.planner.upload_order(self.inputs)
        return order + [i for i in range(n) if i not in order]  # the rest, later

    # hops into the loop ---------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._loop.run(coro, timeout)

    # links and sessions (on the loop) ----------------------------------------------------------
    def _make_link(self, url: str) -> Link:
        """One connection per broker; each carries my inbox, my control topic and every edge's
        status on that broker. Its callbacks post to the loop (a result
        answers its caller on the network thread: ``InboundRouter.on_inbox_message``)."""
        link = MqttLink(
            url, f"device-{self.device_id}", protocol=self.protocol, security=self.security
        )
        post = self._loop.post
        link.subscribe(self.topics.device_inbox(self.device_id, ANY), self.router.on_inbox_message)
        link.subscribe(self.topics.edge_status_all(), lambda m: post(self.router.status, m))
        link.subscribe(
            self.topics.device_control(self.device_id, ANY), lambda m: post(self.router.control, m)
        )
        link.on_reconnect.append(lambda: self._resync_barrier(link))
        return link

    def _resync_barrier(self, link: Link) -> None:
        """On paho's thread, right after a reconnect: have the loop ask every edge on this
        broker for its inventory *before* paho resends the chunks it still holds, and wait for
        that (a loop hop, well under a millisecond). The edge then answers from what survived
        the restart, and the device resends exactly what was lost."""
        # closing, or a busy loop: the upload's own retries cover the rest
        with contextlib.suppress(LoopClosedError, TimeoutError):
            self._loop.call(lambda: self._after_reconnect(link), timeout=2.0)

    def _new_session(self, edge_id: str, url: str, inputs: PlanningInputs) -> EdgeSession:
        s = EdgeSession(
            edge_id,
            url,
            self.connections.link_for(url),
            pkg=self.pkg,
            device_id=self.device_id,
            topics=self.topics,
            inputs=inputs,
            chunk_size=self.chunk_size,
            peer_stall_s=self.peer_stall_s,
        )
        self.sessions[edge_id] = s
        return s

    async def _session_for(self, edge_id: str) -> EdgeSession | None:
        """The session with ``edge_id``, made (and its broker connected) when first needed."""
        s = self.sessions.get(edge_id)
        if s is not None:
            return s
        c = self.candidates.get(edge_id)
        if c is None:
            return None
        if await self.connections.try_ensure(c.broker, 5.0) is None:
            return None
        s = self.sessions.get(edge_id)  # made by another caller while we connected
        if s is not None:
            return s
        est = fresh_estimates(self.session.inputs.estimates)
        inputs = dataclasses.replace(self._base_inputs, estimates=est)
        return self._new_session(edge_id, c.broker, inputs)

    def _after_reconnect(self, link: Link) -> None:
        for s in list(self.sessions.values()):
            if s.link is link and s.announced:
                s.after_reconnect()

    # connection -----------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> Inventory | None:
        """Connect to the current edge's broker and announce the model. Idempotent: a second
        call announces again but starts no second watcher or monitor."""
        return self._run(self._connect(timeout))

    async def _connect(self, timeout: float) -> Inventory | None:
        s = self.session
        await self.connections.ensure(s.broker, timeout)
        inv = await s.announce(timeout)
        if not self._connected:
            self._connected = True
            self._monitor = self._loop.spawn(self.mobility.run())
            if self.interface:
                self._watcher = EdgeWatcher(
                    self.interface,
                    lambda rec: self._loop.post(self._on_zeroconf, rec),
                    lambda edge: self._loop.post(self._on_zeroconf_gone, edge),
                )
                await self._loop.blocking(self._watcher.start)
        return inv

    def probe(self, timeout: float = 2.0) -> float | None:
        """One light RTT probe (hello → inventory); also refreshes the edge's inventory."""
        return self._run(self.session.probe(timeout))

    def close(self) -> None:
        """Stop everything the agent started: watcher, loop tasks, connections."""
        self._stopping = True
        with contextlib.suppress(LoopClosedError, TimeoutError):  # waiting queries: local
            self._loop.call(self.queries.pending.close, timeout=5.0)
        self._loop.close()  # joins its executor: a watcher start in progress has finished
        watcher, self._watcher = self._watcher, None
        if watcher:
            watcher.close()
        self.connections.close_all()

    # handoff --------------------------------------------------------------------------------
    def add_edge(self, edge: str, broker: str) -> None:
        """Make an edge known without discovery (configured, or from another app)."""
        check_id("edge", edge)

        def add() -> None:
            self.candidates.seen(edge, broker, "config")
            self.mobility.wake()

        self._loop.call(add)

    def set_prefer(self, edge: str | None) -> None:
        """Force the device onto ``edge`` whenever it is online (None: the policy decides)."""
        if edge:
            check_id("edge", edge)
        self._loop.call(lambda: self.set_prefer_now(edge))

    def set_prefer_now(self, edge: object) -> None:
        """On the loop: ``edge`` from a control message (checked here)."""
        if edge is not None and not isinstance(edge, str):
            raise TypeError("prefer must be an edge id or null")
        self.prefer = check_id("edge", edge) if edge else None
        self.mobility.wake()

    def move_to(self, edge_id: str, reason: str = "requested", timeout: float = 3.0) -> bool:
        """Make ``edge_id`` the current edge (see ``HandoffController.move_to``)."""
        return self._run(self.mobility.move_to(edge_id, reason, timeout))

    def _on_zeroconf(self, rec: EdgeRecord) -> None:
        try:
            self.candidates.seen(rec.id, rec.broker, "zeroconf", load=rec.load)
        except ValueError as e:  # not allowed, or a broker URL we cannot use
            log.warning("ignored the zeroconf record of %s: %s", rec.id, e)
            return
        self.mobility.wake()

    def _on_zeroconf_gone(self, edge: str) -> None:
        if not self.candidates.gone(edge):
            return  # its status on the broker still says online: a goodbye alone is not enough
        s = self.sessions.get(edge)
        if s is not None:
            s.online = False
            self.queries.pending.release(edge)
        self.mobility.wake()

    # upload ---------------------------------------------------------------------------------
    def start_upload(self, progress: Progress | None = None, block_timeout: float = 30.0) -> None:
        """Upload in the background (it follows handoffs); ``wait_upload`` waits for it."""
        self._loop.call(lambda: self.uploads.start(progress, block_timeout))

    def wait_upload(self, timeout: float | None = None) -> bool:
        return self.uploads.wait(timeout)

    @property
    def upload_rate_Bps(self) -> float | None:  # noqa: N802
        return self.uploads.rate_Bps

    @upload_rate_Bps.setter
    def upload_rate_Bps(self, rate: float | None) -> None:  # noqa: N802
        self.uploads.rate_Bps = rate  # read by the upload on the loop; a float swap

    @property
    def upload_seconds(self) -> float | None:
        return self.uploads.seconds

    def upload(self, progress: Progress | None = None, *, block_timeout: float = 30.0) -> None:
        """Send the current edge every block it lacks, in upload order; resume partial
        blocks; return when done. Follows handoffs: after a move it goes on with the new edge."""
        self.start_upload(progress, block_timeout)
        self.wait_upload()
        if self.uploads.failure is not None:
            raise self.uploads.failure

    # queries --------------------------------------------------------------------------------
    def query(self, x: Array, index: int = 0, split: int | None = None) -> QueryOutcome:
        """Run one query by the current plan; an edge segment that fails (deadline, error,
        edge offline) is finished on the device. Exactly one answer, always. ``x``: the
        model's input, or an image's uint8 pixels (``preprocess.pil_pixels``), normalised
        where block 0 runs and sent to the edge as they are (``QueryRunner.query``)."""
        return self.queries.query(x, index, split)
