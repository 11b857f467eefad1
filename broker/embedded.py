"""The embedded broker: amqtt (MQTT 3.1.1) in a background thread with its own event loop.

Plain, it is for loopback labs: no TLS, no passwords, no ACL, anyone who reaches it can speak
as anyone, so it refuses to listen anywhere but on loopback. Secured
(``EmbeddedSecurity.from_lab(DIR)``, what ``iotoffload security init DIR`` wrote), it runs the
same deployment as the generated mosquitto configuration: TLS with the lab's broker
certificate, the identity from the client certificate or the password file, bound to the
client id, and the ACL by role made from the same rules as mosquitto's acl file
(``iotoffload.deploy.acl``); then it may listen on any address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotoffload.deploy.acl import rules
from iotoffload.deploy.lab import LabRecord


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


@dataclass(frozen=True)
class EmbeddedSecurity:
    """TLS files, the credential check and the ACL (identity -> topic filters)."""

    ca: Path
    cert: Path
    key: Path
    passwords: Path | None  # mosquitto's $7$ password file; None: client certificates
    publish: dict[str, list[str]]
    subscribe: dict[str, list[str]]

    @classmethod
    def from_lab(cls, directory: Path) -> EmbeddedSecurity:
        """The setup ``iotoffload security init DIRECTORY`` wrote (ValueError naming what is
        missing otherwise)."""
        d = directory.expanduser().resolve()
        lab = LabRecord.load(d)
        publish: dict[str, list[str]] = {}
        subscribe: dict[str, list[str]] = {}
        for who, role in lab.agents.items():
            rs = rules(role, who, lab.prefix)
            publish[who] = [r.topic for r in rs if r.access in ("write", "readwrite")]
            subscribe[who] = [r.topic for r in rs if r.access in ("read", "readwrite")]
        passwords = d / "passwd" if lab.auth == "password" else None
        for f in (d / "ca.crt", d / "broker.crt", d / "broker.key", passwords):
            if f is not None and not f.exists():
                raise ValueError(f"{f} is missing: run `iotoffload security init {d} ...` again")
        return cls(d / "ca.crt", d / "broker.crt", d / "broker.key", passwords, publish, subscribe)

    def amqtt_config(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(listener settings, plugins) for amqtt."""
        listener = {"ssl": True, "cafile": str(self.ca), "certfile": str(self.cert)}
        listener["keyfile"] = str(self.key)
        plugins = {
            "broker._amqtt_identity.IdentityAuthPlugin": {"publish_acl": self.publish},
            "broker._amqtt_identity.IdentityAclPlugin": {
                "publish_acl": self.publish,
                "subscribe_acl": self.subscribe,
                "receive_acl": self.subscribe,
            },
        }
        return listener, plugins


def _quiet_resets(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client that drops its connection while amqtt closes it (a refused CONNECT, a TLS
    client that gave up) is not an error of ours: logged at debug, not as a traceback."""
    if isinstance(context.get("exception"), ConnectionError):
        logging.getLogger(__name__).debug("client connection reset: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


class EmbeddedBroker:
    """``with EmbeddedBroker(port=...) as b: b.url`` — stops cleanly on exit.

    ``security``: TLS, identities and the ACL (then any address may be bound).
    ``isolated_network``: the caller vouches that ``host`` is on a network nobody else can
    reach (the bench's own network namespaces); otherwise a plain broker binds loopback only."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        isolated_network: bool = False,
        security: EmbeddedSecurity | None = None,
    ) -> None:
        if not is_loopback(host) and not isolated_network and security is None:
            raise InsecureBindError(
                f"the plain embedded broker lets anyone in and listens on loopback only, not "
                f"on {host}: `iotoffload security init DIR ...`, then `iotoffload broker "
                f"--secured DIR` (or mosquitto -c DIR/mosquitto.conf)"
            )
        self.host = host
        self.port = port or free_port(host)
        self.security = security
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.security is not None else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("embedded broker did not start in time")
        if self._error:
            raise RuntimeError(f"embedded broker failed to start: {self._error!r}") from self._error
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_quiet_resets)
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        plugins: dict[str, Any] = {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
        }
        if self.security is not None:
            tls, plugins = self.security.amqtt_config()
            listener.update(tls)
        config = {"listeners": {"default": listener}, "plugins": plugins}
        try:
            if self.security is None:
                self._broker = Broker(config, loop=loop)
            else:
                from broker._amqtt_identity import IdentityBroker

                pw = self.security.passwords
                self._broker = IdentityBroker(
                    config, password_file=str(pw) if pw else None, loop=loop
                )
            loop.run_until_complete(self._broker.start())
        except BaseException as e:  # reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._broker.shutdown())
        loop.close()

    @property
    def refused_connects(self) -> int:
        """CONNECTs refused for their credentials (secured broker; 0 otherwise)."""
        return int(getattr(self._broker, "refused", 0))

    def session_ids(self) -> list[str]:
        """The client ids of the sessions the broker holds (a snapshot taken on the broker's
        own loop, which owns the session table)."""
        if self._loop is None or self._broker is None or not self._loop.is_running():
            return []
        broker = self._broker

        async def ids() -> list[str]:
            return list(broker.sessions)

        return asyncio.run_coroutine_threadsafe(ids(), self._loop).result(5)

    def stop(self) -> None:
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
