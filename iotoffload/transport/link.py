"""What an agent needs of a broker connection: real (``MqttLink``) and fake transports
implement this protocol, so agents and their tests depend on it rather than on paho."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    """One inbound MQTT message, as a handler receives it."""

    topic: str
    payload: bytes
    retain: bool = False


Handler = Callable[[Message], None]


@runtime_checkable
class Link(Protocol):
    """One connection to one broker. Handlers run on the link's network thread and must only
    hand the message on (to an agent's loop); publishing is thread-safe and never blocks."""

    on_reconnect: list[Callable[[], None]]

    @property
    def connected(self) -> bool: ...

    def connect(self, timeout: float = 10.0) -> None: ...

    def wait_connected(self, timeout: float) -> bool: ...

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None: ...

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        expiry_s: float | None = None,
    ) -> Any: ...

    def close(self) -> None: ...
