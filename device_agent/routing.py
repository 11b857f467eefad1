"""Inbound messages of the device: decoded and dispatched to the session, the pending query or
the mobility controller they concern.

Protocol v2: the sender of an inbox frame is its topic's last level (the broker binds it to
the edge's authenticated identity). A result is taken only from the edge its query went to and
only with the shape the manifest gives the block range's output; inventories, acks and errors
concern only the sender's own session; a frame claiming another edge is dropped.

Owned by the device agent's loop. paho's network threads run ``on_inbox_message``: it decodes
the frame (pure), hands a result straight to its waiting caller through ``Answers`` and posts
everything else here; status and control messages are posted as they come.
"""

from __future__ import annotations

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
    parse_json,
)
from iotoffload.transport.link import Message
from iotoffload.transport.status import EdgeStatus

if TYPE_CHECKING:
    from device_agent.agent import DeviceAgent

log = logging.getLogger(__name__)
MAX_CONTROL_BYTES = 1024  # {"prefer": EDGE} needs far less


class InboundRouter:
    """Owned by the device agent's loop."""

    def __init__(self, agent: DeviceAgent) -> None:
        self._a = agent
        self.refused = 0  # inbox frames dropped: not from the edge they concern (any thread)

    # paho's network thread -------------------------------------------------------------------
    def on_inbox_message(self, m: Message) -> None:
        """Decode here; a result answers its caller at once (the loop learns from it next),
        anything else goes to the loop."""
        got = self._decode(m)
        if got is None:
            return
        h, body, sender = got
        if isinstance(h, Result):
            self._result(h, body, sender)
        else:
            self._a.loop.post(self.dispatch, h, body, sender)

    def _decode(self, m: Message) -> tuple[Header, memoryview, str] | None:
        sender = self._a.topics.sender(m.topic)
        if sender is None:
            log.warning("inbox message on %s: no sender identity in the topic", m.topic)
            return None
        try:
            h, body = decode(m.payload)
        except FrameError as e:
            log.warning("bad frame from %s: %s", sender, e)
            return None
        claimed = getattr(h, "edge", None)
        if claimed is not None and claimed != sender:
            self.refused += 1
            log.warning("dropped a %s from %s claiming to be %s", h.type, sender, claimed)
            return None
        return h, body, sender

    def _result(self, h: Result, body: memoryview, sender: str) -> None:
        """Any thread: answer the query with ``h`` if the edge asked sent it, in its shape."""
        pending = self._a.queries.pending
        if not pending.answers.accepts(h.request_id, sender, (h.tensor.dtype, h.tensor.shape)):
            self.refused += 1
            log.warning(
                "dropped a result for %s from %s: not the edge asked, or not the shape asked for",
                h.request_id,
                sender,
            )
            return
        won = pending.answers.answer(h.request_id, (h, body))
        self._a.loop.post(pending.on_result, h, won, time.perf_counter())

    # the loop ----------------------------------------------------------------------------------
    def inbox(self, m: Message) -> None:
        """A whole inbox message, on the loop (as ``on_inbox_message`` would hand it on)."""
        got = self._decode(m)
        if got is not None:
            self.dispatch(*got)

    def dispatch(self, h: Header, body: memoryview, sender: str) -> None:
        a = self._a
        if isinstance(h, Inventory | UploadAck):
            s = a.sessions.get(sender)
            if s is None or h.model_id != a.pkg.manifest.model_id:
                return
            if isinstance(h, Inventory):
                s.on_inventory(h)
            else:
                s.on_ack(h)
        elif isinstance(h, Result):
            pending = a.queries.pending
            if not pending.answers.accepts(h.request_id, sender, (h.tensor.dtype, h.tensor.shape)):
                self.refused += 1
                return
            won = pending.answers.answer(h.request_id, (h, body))
            pending.on_result(h, won, time.perf_counter())
        elif isinstance(h, Error):
            if h.request_id is not None and not a.queries.pending.answers.accepts(
                h.request_id, sender
            ):
                self.refused += 1
                return
            if not a.queries.pending.on_error(h):
                log.warning("edge %s error %s: %s", sender, h.code, h.message)
                self._session_error(h, sender)

    def _session_error(self, h: Error, sender: str) -> None:
        """An error not tied to a query: an upload chunk refused (``block``/``chunk``), a
        transfer the new edge cannot make (``peer`` = the source), or blocks the old edge
        will not push (``peer`` = the edge fetching them, whose session it concerns, when
        that session fetches from the sender)."""
        if h.peer is not None:
            target = self._a.sessions.get(h.peer)
            if target is not None and target.peer_source == sender:
                target.on_error(h)
                return
        s = self._a.sessions.get(sender)
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
        """{"prefer": "edge-b"} or {"prefer": null} from an operator: force (or release) the
        device's edge, if its policy allows that edge."""
        a = self._a
        op = a.topics.sender(m.topic)
        if op is None or (a.operators is not None and op not in a.operators):
            log.warning("ignored a control message from %s: not an operator of this device", op)
            return
        try:
            if len(m.payload) > MAX_CONTROL_BYTES:
                raise ValueError(f"control message of {len(m.payload)} bytes (at most 1024)")
            cmd = parse_json(bytes(m.payload), max_depth=2)  # a FrameError is a ValueError
            if not isinstance(cmd, dict) or "prefer" not in cmd:
                raise ValueError('expected {"prefer": EDGE or null}')
            target = cmd["prefer"]
            if isinstance(target, str) and not a.candidates.allows(target):
                raise ValueError(f"edge {target} is not in this device's allowed edges")
            a.set_prefer_now(target)
            log.info("operator %s: prefer %s", op, target)
        except (ValueError, TypeError) as e:
            log.warning("ignored control message: %s", e)
