"""Test helpers for the device agent: frames injected into its loop, as a broker would."""

from __future__ import annotations

import threading

import numpy as np

from device_agent.agent import DeviceAgent
from iotoffload.model import ModelPackage
from iotoffload.transport.frame import (
    Announce,
    Error,
    ErrorCode,
    Header,
    Hello,
    Inventory,
    Query,
    Result,
    decode,
    encode,
    encode_tensor_frame,
)
from iotoffload.transport.link import Message
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.topics import DEFAULT_PREFIX, Topics


def inject(
    dev: DeviceAgent,
    frame: Header,
    body: bytes = b"",
    *,
    topic: str | None = None,
    sender: str | None = None,
) -> None:
    """Deliver ``frame`` to the device's inbox handler on its loop and wait until handled; as
    sent by ``sender`` (default: the edge the frame names, else the device's current edge)."""
    who = sender or getattr(frame, "edge", None) or dev.session.edge_id
    m = Message(topic or dev.topics.device_inbox(dev.device_id, who), encode(frame, body))
    dev.loop.call(lambda: dev.router.inbox(m))


def inject_message(dev: DeviceAgent, kind: str, topic: str, payload: bytes) -> None:
    """Deliver a raw message to one of the device's handlers (inbox, status, control)."""
    handler = {
        "inbox": dev.router.inbox,
        "status": dev.router.status,
        "control": dev.router.control,
    }[kind]
    m = Message(topic, payload)
    dev.loop.call(lambda: handler(m))


class ScriptedEdge:
    """A stand-in edge on a real broker: answers announce/hello with an inventory holding every
    block, and each query with a zero tensor of the right shape after ``delay_s``. For tests of
    the device's own machinery (moves, late replies) where a real edge's timing gets in the way.
    Its handlers run on paho's thread; the counters are read after ``close()``."""

    def __init__(
        self,
        url: str,
        edge_id: str,
        pkg: ModelPackage,
        *,
        delay_s: float = 0.0,
        protocol: int = 5,
        prefix: str = DEFAULT_PREFIX,
        refuse_pixels: bool = False,
    ) -> None:
        self.edge_id, self.pkg, self.delay_s = edge_id, pkg, delay_s
        self.topics = Topics(prefix)
        self.queries = 0
        self.refuse_pixels = refuse_pixels  # as an edge older than pixel queries does
        self.dtypes: list[str] = []  # of each query's tensor
        self._timers: list[threading.Timer] = []
        self.link = MqttLink(url, f"scripted-{edge_id}", protocol=protocol)
        self.link.subscribe(self.topics.edge_control(edge_id, "+"), self._on_control)
        self.link.subscribe(self.topics.edge_query(edge_id, "+"), self._on_query)
        self.link.connect()

    def _inbox(self, device: str) -> str:
        return self.topics.device_inbox(device, self.edge_id)

    def _on_control(self, m: Message) -> None:
        h, _ = decode(m.payload)
        if isinstance(h, Announce | Hello):
            inv = Inventory(
                model_id=h.model_id,
                known=True,
                edge=self.edge_id,
                stored=list(range(self.pkg.num_blocks)),
            )
            self.link.publish(self._inbox(h.device), encode(inv))

    def _on_query(self, m: Message) -> None:
        h, _ = decode(m.payload)
        assert isinstance(h, Query)
        self.queries += 1
        self.dtypes.append(h.tensor.dtype)
        if self.refuse_pixels and h.pixels is not None:
            err = Error(
                request_id=h.request_id,
                code=ErrorCode.INVALID_HEADER,
                message="query: pixels: Extra inputs are not permitted",
                edge=self.edge_id,
            )
            self.link.publish(self._inbox(h.device), encode(err))
            return
        out = self.pkg.blocks[h.end - 1].output
        y = np.zeros(out.shape, out.dtype)
        frame = encode_tensor_frame(Result, y, request_id=h.request_id, queue_ms=0.0, exec_ms=0.1)

        def reply() -> None:
            self.link.publish(self._inbox(h.device), frame)

        if self.delay_s:
            t = threading.Timer(self.delay_s, reply)
            self._timers.append(t)
            t.start()
        else:
            reply()

    def close(self) -> None:
        for t in self._timers:
            t.join()
        self.link.close()
