"""The embedded broker: amqtt (MQTT 3.1.1) in a background thread with its own event loop.

It is for loopback labs: no TLS, no passwords, no ACLs (amqtt's own would need its config
format and a second ACL of ours to keep true), so anyone who reaches it can speak as anyone.
It refuses to listen anywhere but on loopback; a real deployment runs mosquitto with the
configuration ``iotoffload security init`` writes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class InsecureBindError(ValueError):
    """The embedded broker was asked to listen beyond loopback."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EmbeddedBroker:
    """``with EmbeddedBroker(port=...) as b: b.url`` — stops cleanly on exit.

    ``isolated_network``: the caller vouches that ``host`` is on a network nobody else can
    reach (the bench's own network namespaces); otherwise only loopback is allowed."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, *, isolated_network: bool = False
    ) -> None:
        if not is_loopback(host) and not isolated_network:
            raise InsecureBindError(
                f"the embedded broker has no TLS, passwords or ACLs and listens on loopback "
                f"only, not on {host}: run mosquitto with the configuration of "
                f"`iotoffload security init` and give the agents --broker mqtts://..."
            )
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("embedded broker did not start in time")
        if self._error:
            raise RuntimeError(f"embedded broker failed to start: {self._error}")
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        try:
            self._broker = Broker(config, loop=loop)
            loop.run_until_complete(self._broker.start())
        except BaseException as e:  # reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._broker.shutdown())
        loop.close()

    def stop(self) -> None:
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
