"""Inbound messages of the device: decoded and dispatched to the session, the pending query or
the mobility controller they concern.

Owned by the device agent's loop. paho's network threads run ``on_inbox_message``: it decodes
the frame (pure), hands a result straight to its waiting caller through ``Answers`` and posts
everything else here; status and control messages are posted as they come.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from iotoffload.transport.frame import (
    Error,
    FrameError,
    Header,
    Inventory,
    Result,
    UploadAck,
    decode,
)
from iotoffload.transport.link import Message
from iotoffload.transport.status import EdgeStatus

if TYPE_CHECKING:
    from device_agent.agent import DeviceAgent
    from device_agent.edge_session import EdgeSession

log = logging.getLogger(__name__)


class InboundRouter:
    """Owned by the device agent's loop."""

    def __init__(self, agent: DeviceAgent) -> None:
        self._a = agent

    def _session_of(self, edge: str | None) -> EdgeSession | None:
        return self._a.sessions.get(edge) if edge else self._a.session

    # paho's network thread -------------------------------------------------------------------
    def on_inbox_message(self, m: Message) -> None:
        """Decode here; a result answers its caller at once (the loop learns from it next),
        anything else goes to the loop."""
        try:
            h, body = decode(m.payload)
        except FrameError as e:
            log.warning("bad frame from an edge: %s", e)
            return
        post = self._a.loop.post
        if isinstance(h, Result):
            pending = self._a.queries.pending
            won = pending.answers.answer(h.request_id, (h, body))
            post(pending.on_result, h, won, time.perf_counter())
        else:
            post(self.dispatch, h, body)

    # the loop ----------------------------------------------------------------------------------
    def inbox(self, m: Message) -> None:
        """A whole inbox message, on the loop (as ``on_inbox_message`` would hand it on)."""
        try:
            h, body = decode(m.payload)
        except FrameError as e:
            log.warning("bad frame from an edge: %s", e)
            return
        self.dispatch(h, body)

    def dispatch(self, h: Header, body: memoryview) -> None:
        a = self._a
        if isinstance(h, Inventory | UploadAck):
            s = self._session_of(h.edge)
            if s is None or h.model_id != a.pkg.manifest.model_id:
                return
            if isinstance(h, Inventory):
                s.on_inventory(h)
            else:
                s.on_ack(h)
        elif isinstance(h, Result):
            pending = a.queries.pending
            won = pending.answers.answer(h.request_id, (h, body))
            pending.on_result(h, won, time.perf_counter())
        elif isinstance(h, Error) and not a.queries.pending.on_error(h):
            log.warning("edge %s error %s: %s", h.edge or "?", h.code, h.message)
            self._session_error(h)

    def _session_error(self, h: Error) -> None:
        """An error not tied to a query: an upload chunk refused (``block``/``chunk``), a
        transfer the new edge cannot make (``peer`` = the source), or a block the old edge will
        not push (``block`` and ``peer`` = the edge fetching it, whose session it concerns)."""
        if h.peer is not None and h.block is not None:
            target = self._a.sessions.get(h.peer)
            if target is not None and target.peer_source == h.edge:
                target.on_error(h)
            return
        s = self._session_of(h.edge)
        if s is not None:
            s.on_error(h)

    def status(self, m: Message) -> None:
        a = self._a
        st = EdgeStatus.parse(m.payload)
        if st is None or m.topic != a.topics.edge_status(st.edge):
            return  # not a status, or one claiming another edge's name
        c = a.candidates.from_edge_status(st)
        if c is None:
            return
        s = a.sessions.get(c.id)
        if s is not None:
            s.on_status(c.online, c.queue_ms)
        if not c.online:
            a.queries.pending.release(c.id)
        a.mobility.wake()

    def control(self, m: Message) -> None:
        """{"prefer": "edge-b"} or {"prefer": null}: force (or release) the device's edge."""
        try:
            cmd = json.loads(m.payload)
            if not isinstance(cmd, dict) or "prefer" not in cmd:
                raise ValueError('expected {"prefer": EDGE or null}')
            self._a.set_prefer_now(cmd["prefer"])
        except (ValueError, TypeError, RecursionError) as e:
            log.warning("ignored control message: %s", e)
