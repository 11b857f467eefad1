"""Connections: one link per broker, opened once however many ask at once, never replaced."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from device_agent.connections import Connections
from iotoffload.loop import AgentLoop
from iotoffload.transport.link import Handler
from iotoffload.transport.mqtt import BrokerUnavailableError


class SlowLink:
    """A Link whose connect takes 0.2 s and fails while ``up`` is False."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.on_reconnect: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout: float = 10.0) -> None:
        self.connects += 1
        time.sleep(0.2)
        if not self.state["up"]:
            raise BrokerUnavailableError("down")
        self._connected.set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        pass

    def publish(self, *_a: Any, **_k: Any) -> None:
        pass

    def close(self) -> None:
        self._connected.clear()


@pytest.fixture
def loop() -> Iterator[AgentLoop]:
    lp = AgentLoop("t-conn")
    yield lp
    lp.close()


def _conns(loop: AgentLoop, state: dict[str, Any]) -> tuple[Connections, list[SlowLink]]:
    made: list[SlowLink] = []

    def make(_url: str) -> SlowLink:
        made.append(SlowLink(state))
        return made[-1]

    return Connections(loop, make), made  # type: ignore[arg-type]


def test_concurrent_ensures_share_one_connect(loop: AgentLoop) -> None:
    conns, made = _conns(loop, {"up": True})

    async def both() -> list[object]:
        return list(await asyncio.gather(*(conns.ensure("mqtt://b:1") for _ in range(5))))

    links = loop.run(both(), 5)
    assert len(made) == 1 and made[0].connects == 1 and all(x is made[0] for x in links)
    conns.close_all()


def test_a_failed_connect_keeps_the_link_and_a_retry_uses_it(loop: AgentLoop) -> None:
    state = {"up": False}
    conns, made = _conns(loop, state)
    with pytest.raises(BrokerUnavailableError):
        loop.run(conns.ensure("mqtt://b:1"), 5)
    state["up"] = True  # the broker came up: the same link connects (sessions hold it)
    assert loop.run(conns.ensure("mqtt://b:1"), 5) is made[0]
    assert len(made) == 1 and made[0].connects == 2
    made[0]._connected.clear()  # paho lost the broker and is reconnecting by itself
    state["up"] = False
    with pytest.raises(BrokerUnavailableError):
        loop.run(conns.ensure("mqtt://b:1", timeout=0.2), 5)
    assert made[0].connects == 2  # no second connect on a link paho reconnects
    conns.close_all()
