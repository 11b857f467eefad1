"""A small wrapper over paho-mqtt: URL parsing, MQTT 5 or 3.1.1, TLS and credentials
(``MqttSecurity``), a Last Will, handlers per topic filter, and a network thread that
reconnects by itself.

Handlers run on paho's network thread: they must be quick (hand heavy work to a queue).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from iotoffload.transport.link import Handler, Message
from iotoffload.transport.security import (
    BrokerAuthError,
    MqttSecurity,
    SecurityConfigError,
    tls_failure,
)

__all__ = [
    "BrokerAuthError",
    "BrokerURL",
    "BrokerUnavailableError",
    "Handler",
    "Message",
    "MqttLink",
    "MqttSecurity",
    "SecurityConfigError",
]
log = logging.getLogger(__name__)


class BrokerUnavailableError(ConnectionError):
    pass


# a refused CONNECT that retrying cannot fix (MQTT 5 reason codes; paho maps 3.1.1's too)
_AUTH_REFUSALS = ("not authorized", "bad user name or password", "banned", "bad authentication")


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://HOST[:1883]`` or, with TLS, ``mqtts://HOST[:8883]``; or several, comma-
    separated, for the nodes of one clustered broker (``mqtt://10.0.0.1,mqtt://10.0.0.2``).
    The nodes are a set: kept sorted (``str()`` is the canonical list, the same however a
    user ordered it, so agents configured alike name the broker alike); ``host``/``port``
    is the first. A link starts at a node chosen from its client id (``first_node``: the
    clients spread over the cluster) and moves to the next when its node goes."""

    host: str
    port: int
    tls: bool = False
    others: tuple[tuple[str, int], ...] = ()  # the cluster's other nodes, in order

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = [p.strip() for p in url.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"broker URL {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        nodes = [cls._parse_one(p) for p in parts]
        if len({n.tls for n in nodes}) > 1:
            raise ValueError(
                f"broker URL {url!r}: the nodes of one broker are all mqtt:// or all mqtts://"
            )
        seen: list[tuple[str, int]] = []
        for n in nodes:
            if (n.host, n.port) not in seen:
                seen.append((n.host, n.port))
        (host, port), *others = sorted(seen)
        return cls(host, port, nodes[0].tls, tuple(others))

    @classmethod
    def _parse_one(cls, url: str) -> BrokerURL:
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        tls = u.scheme in ("mqtts", "ssl")
        if (u.scheme not in ("mqtt", "tcp") and not tls) or not u.hostname:
            raise ValueError(f"broker URL {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        try:
            port = u.port
        except ValueError as e:
            raise ValueError(f"broker URL {url!r}: {e}") from None
        return cls(u.hostname, port or (8883 if tls else 1883), tls)

    @property
    def nodes(self) -> tuple[BrokerURL, ...]:
        """Each node as a URL of its own, the first first."""
        return tuple(BrokerURL(h, p, self.tls) for h, p in ((self.host, self.port), *self.others))

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return ",".join(
            f"{scheme}://{f'[{h}]' if ':' in h else h}:{p}"
            for h, p in ((self.host, self.port), *self.others)
        )


def first_node(client_id: str, nodes: int) -> int:
    """The node a client of a clustered broker connects to first: the same for the same
    client id (stable across runs, unlike ``hash``), spread over the nodes."""
    return zlib.crc32(client_id.encode()) % max(1, nodes)


# The socket's send buffer, at least: a whole upload window (two 512 KB chunks and the link's
# bandwidth-delay product) fits the kernel, so the publishing thread writes each chunk at once.
# Linux's autotuned buffer took a 512 KB chunk in four writes on an 80 Mbit/s link, each one
# waking paho's network thread on "writable" (429 wake-ups for 175 chunks; 41 with this). No
# more is queued than before: the upload's window, not the buffer, bounds what is in flight.
SEND_BUFFER_BYTES = 2 * 1024 * 1024
MAX_ROUTES = 1024  # topics whose handlers are remembered (a wildcard may see many topics)
MAX_ROUTE_TOPIC = 512  # longer topics (ours are far shorter) are matched, not remembered


def _queues_packets_as_expected() -> bool:
    """paho's private ``_packet_queue`` as this module's override expects it (paho 2.x)."""
    try:
        params = list(inspect.signature(mqtt.Client._packet_queue).parameters)
    except (AttributeError, TypeError, ValueError):
        return False
    if params[:5] != ["self", "command", "packet", "mid", "qos"]:
        return False
    # what the direct write relies on besides (paho 2.x's threaded-mode internals; the
    # instance attributes it reads are checked by the transport tests)
    methods = ("_packet_write", "_sock_close")
    return all(callable(getattr(mqtt.Client, m, None)) for m in methods) and hasattr(
        getattr(mqtt, "_ConnectionState", None), "MQTT_CS_CONNECTED"
    )


def _widen_send_buffer(sock: socket.socket) -> None:
    """At least SEND_BUFFER_BYTES of send buffer (never less than the system gave: Linux
    reports twice what was set, and a larger system default is kept)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * SEND_BUFFER_BYTES:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    except OSError as e:  # a platform that refuses it: the autotuned buffer works, slower
        log.debug("send buffer not widened: %s", e)


class _Client(mqtt.Client):
    """paho's client, with two changes to how packets are written.

    - Each packet is written from a memoryview. paho slices the packet it is writing for
      every send call (``packet[pos:]``): with a bytearray that copies the rest of it, a
      whole upload chunk per chunk; a memoryview's slice copies nothing.
    - A thread that publishes writes its PUBLISH packet to the socket itself, when the link
      is up, plain TCP, and no other thread is writing. paho's threaded mode instead wakes
      its network thread through a socket pair to do the write: a thread hand-off per
      packet, paid by every query, result and upload chunk. What the socket does not take at
      once (it is non-blocking) is left to the network thread as before.

    ``_writing`` serialises the writers of the socket: packets leave whole and in queue
    order. A publishing thread only tries it (when the network thread holds it, the packet
    is left to that thread, so a publisher never waits) and writes only PUBLISH packets,
    re-checking the state before each: any other packet (a DISCONNECT, say) and its
    completion, which runs paho's callbacks and state changes, stay the network thread's.
    ``_sock_close`` takes the lock, so no packet goes to a socket a reconnect is replacing,
    and the state check keeps packets off a new socket until its CONNACK. Over TLS there is
    no direct write: paho's loop uses the SSL object outside any lock of ours (``pending``),
    and one SSL object must never be used by two threads at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writing = threading.RLock()

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: mqtt.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        view: Any = memoryview(packet)  # paho only slices it, measures it and sends it
        thread = self._thread
        if thread is None or threading.current_thread() is thread or self._ssl:
            return super()._packet_queue(command, view, mid, qos, info)
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(view),
                "packet": view,
                "info": info,
            }
        )
        if self._writing.acquire(blocking=False):
            try:
                self._write_publishes()
            finally:
                self._writing.release()
        if self._out_packet and self._sockpairW is not None:  # the rest: network thread
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                self._sockpairW.send(b"\0")
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _write_publishes(self) -> None:
        """Under ``_writing``: write the queued PUBLISH packets in order until the socket
        takes no more, the link is not up, or the next packet is another kind."""
        queued = self._out_packet
        wrote = False
        while queued and self._state is _CONNECTED:
            packet = queued[0]
            if (packet["command"] & 0xF0) != _PUBLISH or (
                packet["qos"] == 0 and self.on_publish is not None  # a callback: not here
            ):
                break
            try:
                n = self._sock_send(packet["packet"][packet["pos"] :])
            except OSError:  # full (BlockingIOError), or lost: the network thread's to handle
                break
            wrote = True
            packet["to_process"] -= n
            packet["pos"] += n
            if packet["to_process"] > 0:  # the rest when the socket drains
                break
            queued.popleft()
            if packet["qos"] == 0 and packet["info"] is not None:
                packet["info"]._set_as_published()  # as paho does for QoS 0 once written
        if wrote:
            with self._msgtime_mutex:
                self._last_msg_out = mqtt.time_func()  # paho's keepalive clock

    def _packet_write(self) -> MQTTErrorCode:
        with self._writing:
            return super()._packet_write()

    def _sock_close(self) -> None:
        with self._writing:
            super()._sock_close()


_CONNECTED = getattr(getattr(mqtt, "_ConnectionState", None), "MQTT_CS_CONNECTED", None)
_PUBLISH = int(mqtt.PUBLISH)  # the packet type (high nibble of the first byte)


# another paho may queue packets otherwise: then its own client, copies and all
_VIEW_PACKETS = _queues_packets_as_expected()


class MqttLink:
    """A ``Link`` over paho-mqtt. Owned by the agent that made it; paho's network thread
    runs the handlers (which only hand messages on) and the reconnect hooks."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        protocol: int = 5,
        will: tuple[str, bytes, bool] | None = None,
        keepalive: int = 15,
        security: MqttSecurity | None = None,
    ) -> None:
        if protocol not in (5, 311):
            raise ValueError("protocol must be 5 or 311")
        self.url = BrokerURL.parse(url)
        self._nodes = self.url.nodes  # a clustered broker's nodes: on to the next when one goes
        # the node connected to (or tried next); the network thread moves it
        self._at = first_node(client_id, len(self._nodes))
        self._failovers = 0  # node changes after a failure (network thread)
        self.security = security or MqttSecurity()
        if self.security.uses_tls_settings and not self.url.tls:
            raise SecurityConfigError(
                f"TLS settings (CA, certificate, key) are given but the broker URL {self.url} "
                "is plain MQTT: use mqtts://"
            )
        # checked once, here: a missing file or a bad key is a setup error, not a retry
        self._tls = self.security.ssl_context() if self.url.tls else None
        self._password = self.security.read_password()
        self.protocol = protocol
        self._client_id = client_id
        self._will = will
        self._handlers: list[tuple[str, int, Handler]] = []
        # topic -> its handlers: matching every filter on every message costs more than
        # the handler (paho's topic_matches_sub builds a matcher per call). Replaced, not
        # changed, by subscribe (another thread), so the network thread reads one or the other.
        self._routes: dict[str, tuple[Handler, ...]] = {}
        self._connected = threading.Event()
        self._refused = threading.Event()
        self._refusal = ""
        self._tls_dropped = False  # a TLS link closed by the broker before any CONNACK
        self._keepalive = keepalive
        self._connects = 0
        self._subacks: set[int] = set()  # SUBACKs a (re)connect waits for (network thread)
        self.on_reconnect: list[Callable[[], None]] = []  # run after every reconnect
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        c = (_Client if _VIEW_PACKETS else mqtt.Client)(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5
            if self.protocol == 5
            else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.protocol == 5 else True,
        )
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.2, 2)  # type: ignore[arg-type]
        if self._tls is not None:
            c.tls_set_context(self._tls)
            if self.security.tls_insecure:
                c.tls_insecure_set(True)
        if self.security.username:
            c.username_pw_set(self.security.username, self._password)
        if self._will:
            c.will_set(self._will[0], self._will[1], qos=1, retain=self._will[2])
        c.on_socket_open = self._on_socket_open
        c.on_connect_fail = self._on_connect_fail
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def node(self) -> BrokerURL:
        """The broker node this link is connected to, or tries next."""
        return self._nodes[self._at]

    def connect(self, timeout: float = 10.0) -> None:
        """Connect; an MQTT 5 client falls back to 3.1.1 when the broker speaks only that.

        Raises ``BrokerAuthError`` (never retried) when TLS verification fails either way or
        the broker refuses the credentials, ``BrokerUnavailableError`` when it is not there."""
        self._refused.clear()
        self._tls_dropped = False
        unreachable: list[str] = []
        for _ in self._nodes:  # the first node that takes the connection (one, unclustered)
            node = self.node
            try:
                self.client.connect(node.host, node.port, keepalive=self._keepalive)
                break
            except ssl.SSLError as e:
                self._close_quietly()
                raise tls_failure(e, str(node), self.security) from None
            except OSError as e:
                self._close_quietly()
                unreachable.append(f"{node}: {e}")
                self._next_node(self.client)
        else:
            raise BrokerUnavailableError(f"cannot reach the broker at {'; '.join(unreachable)}")
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.is_set() and time.monotonic() < deadline:
            if self._refused.wait(0.05) or self._tls_dropped:
                break
        if self._connected.is_set():
            return
        self.close()
        no_v5 = self._refused.is_set() and "protocol" in self._refusal.lower()
        # a TLS broker of 3.1.1 only (amqtt) may drop an MQTT 5 CONNECT without a CONNACK, as
        # a broker refusing the certificate does: 3.1.1 once tells the two apart
        no_v5 = no_v5 or (self._tls_dropped and not self._refused.is_set())
        if no_v5 and self.protocol == 5:
            log.info("broker %s speaks no MQTT 5: using 3.1.1", self.url)
            self.protocol = 311
            self.client = self._make_client()
            return self.connect(max(0.5, deadline - time.monotonic()))
        if self._refused.is_set() and any(r in self._refusal.lower() for r in _AUTH_REFUSALS):
            raise BrokerAuthError(
                f"broker {self.url} refused the connection: {self._refusal} "
                f"(this client presented {self.security.describe()})"
            )
        if not self._refused.is_set() and self._tls_dropped:
            raise BrokerAuthError(
                f"broker {self.url} closed the TLS connection before accepting it: most likely "
                f"it does not accept this client's certificate ({self.security.describe()})"
            )
        why = (
            f"refused: {self._refusal}"
            if self._refused.is_set()
            else f"left {len(self._subacks)} subscriptions unacknowledged"
            if self._subacks
            else "no CONNACK"
        )
        raise BrokerUnavailableError(f"broker {self.url} {why} (within {timeout:g} s)")

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        self._handlers.append((topic, qos, handler))
        self._routes = {}
        if self.connected:
            self.client.subscribe(topic, qos)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        expiry_s: float | None = None,
    ) -> Any:
        """Publish; ``expiry_s`` sets MQTT 5 message expiry (ignored on 3.1.1), so a broker
        drops a query nobody could answer in time instead of delivering it late."""
        props = None
        if expiry_s is not None and self.protocol == 5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = max(1, math.ceil(expiry_s))
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self._connected.clear()

    def _close_quietly(self) -> None:
        """After a failed connect: paho's socket closed, no network thread left."""
        try:
            self.close()
        except Exception:  # nothing was connected
            log.debug("closing a link that never connected", exc_info=True)

    # paho callbacks (network thread) -------------------------------------------------------
    @staticmethod
    def _on_socket_open(_c: mqtt.Client, _u: Any, sock: Any) -> None:
        # Without this, Nagle's algorithm holds a frame's tail until the broker's delayed ACK:
        # +40 ms on every query on loopback.
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _widen_send_buffer(sock)

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.is_failure:
            self._refusal = str(rc)
            self._refused.set()
            log.info("broker %s refused the connection: %s", self.url, rc)
            return
        # (re)subscribe after every (re)connect; connected once the broker has acknowledged
        # every subscription: a message sent to us right after connect() returns (or after a
        # reconnect) must not reach the broker before our SUBSCRIBE does and be dropped
        self._subacks = set()
        for topic, qos, _ in self._handlers:
            err, mid = client.subscribe(topic, qos)
            if err == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._subacks.add(mid)
        if not self._subacks:
            self._now_connected()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        if mid not in self._subacks:
            return  # a subscribe() while connected: nothing waits for it
        if any(getattr(c, "is_failure", False) for c in codes or ()):
            log.warning("broker %s refused a subscription: %s", self.url, codes)
        self._subacks.discard(mid)
        if not self._subacks:
            self._now_connected()

    def _now_connected(self) -> None:
        self._connected.set()
        self._connects += 1
        if self._connects > 1:
            for cb in self.on_reconnect:
                try:
                    cb()
                except Exception:
                    log.exception("reconnect hook failed")

    def _on_connect_fail(self, client: mqtt.Client, _u: Any) -> None:
        """A reconnect could not reach the node: the next one is tried (a clustered
        broker's node that died; an unclustered broker is tried again, as before)."""
        if self._next_node(client):
            log.info("broker node unreachable: reconnecting through %s", self.node)

    def _next_node(self, client: mqtt.Client) -> bool:
        """Point ``client`` at the next node of a clustered broker (its connection closed:
        ``connect``'s thread before the network thread runs, or that thread). False for one
        node: nothing to move to."""
        if len(self._nodes) < 2:
            return False
        self._at = (self._at + 1) % len(self._nodes)
        node = self.node
        # paho's host/port setters refuse while it is reconnecting (state "connecting"),
        # which is when a reconnect fails; its next (re)connect opens its socket to these
        client._host, client._port = node.host, node.port
        # and under a client id of its own: a cluster keeps the old session of our id on
        # the dead node, and a node asked for it answers no CONNACK until that node is back
        # (RabbitMQ). Topics and ACLs go by identity (username, certificate), never by id.
        self._failovers += 1
        client._client_id = f"{self._client_id}-f{self._failovers}".encode()
        return True

    def _on_disconnect(self, *_a: Any) -> None:
        if self._tls is not None and self._connects == 0:
            # TLS 1.3 finishes the handshake before the broker checks our certificate: a
            # refusal arrives as the connection closing before its CONNACK
            self._tls_dropped = True
        self._connected.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic  # decoded from bytes on every access
        routes = self._routes
        handlers = routes.get(topic)
        if handlers is None:
            handlers = tuple(h for p, _, h in self._handlers if mqtt.topic_matches_sub(p, topic))
            if len(topic) <= MAX_ROUTE_TOPIC:  # hostile publishers may invent topics: bounded
                if len(routes) >= MAX_ROUTES:
                    routes.clear()
                routes[topic] = handlers
        m = Message(topic, bytes(msg.payload), bool(msg.retain))
        for handler in handlers:
            try:
                handler(m)
            except Exception:  # a handler bug must not kill the network thread
                log.exception("handler for %s failed", topic)
