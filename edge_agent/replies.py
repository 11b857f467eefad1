"""Answers to devices: frames to a device's inbox, and refusals counted and answered with a
typed error frame."""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_agent.stats import EdgeStats
from iotoffload.transport.frame import (
    Error,
    ErrorCode,
    Header,
    Inventory,
    ModelList,
    ProtocolError,
    UploadAck,
    UploadChunk,
    encode,
)
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)


def device_of(h: Header) -> str | None:
    d = getattr(h, "device", None)
    return d if isinstance(d, str) else None


class Replies:
    """Owned by the edge's loop (it counts into the loop's ``EdgeStats``); ``publish`` alone
    touches no state and the workers call it too."""

    def __init__(
        self,
        edge_id: str,
        topics: Topics,
        stats: EdgeStats,
        link: Callable[[], MqttLink | None],
    ) -> None:
        self.edge_id = edge_id
        self.topics = topics
        self._stats = stats
        self._link = link

    def publish(self, device: str, frame: bytes, qos: int = 1) -> None:
        """An encoded frame to ``device``'s inbox."""
        link = self._link()
        if link is not None:
            link.publish(self.topics.device_inbox(device, self.edge_id), frame, qos=qos)

    def reply(
        self, device: str, header: Inventory | UploadAck | Error | ModelList, qos: int = 1
    ) -> None:
        self.publish(device, encode(header), qos)

    def error(self, e: ProtocolError) -> None:
        """Count a refusal and answer it with an error frame (when it names a device)."""
        code = e.code.value
        self._stats.errors += 1
        self._stats.error_codes[code] = self._stats.error_codes.get(code, 0) + 1
        log.warning("error %s for %s: %s", code, e.device or "?", e)
        if e.device:
            self.reply(e.device, Error.of(e, edge=self.edge_id))

    def chunk_error(self, h: UploadChunk, code: ErrorCode, message: str) -> None:
        self.error(ProtocolError(code, message, device=h.device, block=h.block, chunk=h.chunk))

    def unexpected(self, h: Header, topic: str, sender: str | None = None) -> None:
        """A valid frame of a type ``topic`` does not take; answered to ``sender`` (the topic's
        identity) when known."""
        msg = f"{h.type} on the {topic} topic"
        who = sender if sender is not None else device_of(h)
        self.error(ProtocolError(ErrorCode.UNEXPECTED, msg, device=who))
