"""zeroconf service ``_iotoffload._tcp.local.``; TXT keys: id, v (frame version), broker, load."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zeroconf import (
    DNSQuestionType,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from iotoffload.ids import is_id
from iotoffload.transport.frame import FRAME_VERSION
from iotoffload.transport.mqtt import BrokerURL

SERVICE_TYPE = "_iotoffload._tcp.local."
CONFLICT_CHECK_MS = 1500  # asking for an edge already answering for our name (see register)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeRecord:
    id: str
    broker: str
    version: int
    load: float
    address: str


def _zc(interface: str) -> Zeroconf:
    socket.inet_aton(interface)  # an IPv4 address, never "all interfaces" by accident
    return Zeroconf(interfaces=[interface])


class EdgeAdvertiser:
    """An edge's zeroconf registration. Owned by the edge agent (its loop calls ``update``);
    python-zeroconf's own loop thread does the multicast."""

    def __init__(self, edge_id: str, broker_url: str, interface: str) -> None:
        self.edge_id = edge_id
        self.broker = BrokerURL.parse(broker_url)
        self.interface = interface
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None

    def _make_info(self, load: float) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.edge_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(self.interface)],
            port=self.broker.port,
            properties={
                "id": self.edge_id,
                "v": str(FRAME_VERSION),
                "broker": str(self.broker),
                "load": f"{load:.3f}",
            },
            server=f"{self.edge_id}.local.",
        )

    def register(self, load: float = 0.0) -> None:
        self._zc = _zc(self.interface)
        self._info = self._make_info(load)
        try:
            # Ask first, for a multicast answer. zeroconf's own probe asks for a unicast one,
            # sent to port 5353 of the asker's address: where several responders share that
            # port on one host (SO_REUSEPORT, e.g. two edges on a lab machine), the kernel
            # hands it to one socket of its choosing, often not the asker's, and the
            # conflict goes unseen. A responder multicasts a record at most once a second
            # (RFC 6762), so an edge registered just now answers only the later retries of
            # this question: hence 1.5 s, paid once per advertised edge start.
            taken = ServiceInfo(SERVICE_TYPE, self._info.name)
            if taken.request(self._zc, CONFLICT_CHECK_MS, question_type=DNSQuestionType.QM):
                raise NonUniqueNameException
            self._zc.register_service(self._info, allow_name_change=False)
        except NonUniqueNameException as e:
            self._zc.close()
            self._zc = None
            raise ValueError(
                f"edge id {self.edge_id!r} is already advertised on {self.interface}: "
                "choose another --id"
            ) from e

    def update(self, load: float) -> None:
        if self._zc and self._info:
            self._info = self._make_info(load)
            self._zc.update_service(self._info)

    def close(self) -> None:
        if self._zc:
            if self._info:
                self._zc.unregister_service(self._info)
            self._zc.close()
            self._zc = None


def _record(info: ServiceInfo) -> EdgeRecord | None:
    p: dict[str, Any] = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in (info.properties or {}).items()
    }
    if not is_id(p.get("id")):  # it becomes a topic level: no wildcards, no separators
        return None
    try:
        return EdgeRecord(
            id=str(p["id"]),
            broker=str(p["broker"]),
            version=int(p.get("v", 0)),
            load=float(p.get("load", 0.0)),
            address=info.parsed_addresses()[0] if info.parsed_addresses() else "",
        )
    except (KeyError, ValueError):
        return None


def browse_edges(
    interface: str, timeout: float = 3.0, want: int | None = None, edge_id: str | None = None
) -> list[EdgeRecord]:
    """Edges seen within ``timeout`` seconds (returns early once ``want`` were resolved, or
    once the edge ``edge_id`` was)."""
    zc = _zc(interface)
    names: set[str] = set()
    seen = threading.Event()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.add(name)
            seen.set()

    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
    found: dict[str, EdgeRecord] = {}
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            seen.wait(max(0.0, min(0.2, end - time.monotonic())))
            seen.clear()
            for name in list(names):
                if name in found:
                    continue
                info = zc.get_service_info(SERVICE_TYPE, name, timeout=1000)
                rec = _record(info) if info else None
                if rec:
                    found[name] = rec
            if want is not None and len(found) >= want:
                break
            if edge_id is not None and any(r.id == edge_id for r in found.values()):
                break
    finally:
        browser.cancel()
        zc.close()
    return sorted(found.values(), key=lambda r: (r.load, r.id))


class EdgeWatcher:
    """Keeps watching for edges: ``on_seen`` for every added or updated edge (resolved off the
    browser's thread, which must not block), ``on_gone`` with the id of a removed one.

    Owned by the agent that starts it; the callbacks run on its ``edge-watch`` thread and must
    only hand the record on (the device agent posts it to its loop)."""

    def __init__(
        self,
        interface: str,
        on_seen: Callable[[EdgeRecord], None],
        on_gone: Callable[[str], None],
    ) -> None:
        self.interface = interface
        self._on_seen = on_seen
        self._on_gone = on_gone
        self._events: queue.Queue[tuple[str, ServiceStateChange] | None] = queue.Queue()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._zc = _zc(self.interface)
        self._thread = threading.Thread(target=self._resolve_loop, name="edge-watch", daemon=True)
        self._thread.start()
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        self._events.put((name, state_change))

    def _resolve_loop(self) -> None:
        while (ev := self._events.get()) is not None:
            name, change = ev
            try:
                if change is ServiceStateChange.Removed:
                    self._on_gone(name.removesuffix(f".{SERVICE_TYPE}"))
                    continue
                info = self._zc.get_service_info(SERVICE_TYPE, name, 1000) if self._zc else None
                rec = _record(info) if info else None
                if rec:
                    self._on_seen(rec)
            except Exception:  # a callback bug must not end the watch
                log.exception("edge watcher callback failed")

    def close(self) -> None:
        if self._browser:
            self._browser.cancel()
        self._events.put(None)
        if self._thread:
            self._thread.join(2)
        if self._zc:
            self._zc.close()
            self._zc = None
