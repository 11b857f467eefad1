"""zeroconf service ``_iotoffload._tcp.local.``; TXT keys: id, v (frame version), broker, load."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from zeroconf import (
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from iotoffload.transport.frame import FRAME_VERSION
from iotoffload.transport.mqtt import BrokerURL

SERVICE_TYPE = "_iotoffload._tcp.local."


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
    try:
        return EdgeRecord(
            id=str(p["id"]), broker=str(p["broker"]), version=int(p.get("v", 0)),
            load=float(p.get("load", 0.0)),
            address=info.parsed_addresses()[0] if info.parsed_addresses() else "",
        )  # fmt: skip
    except (KeyError, ValueError):
        return None


def browse_edges(interface: str, timeout: float = 3.0, want: int | None = None) -> list[EdgeRecord]:
    """Edges seen within ``timeout`` seconds (returns early once ``want`` were resolved)."""
    zc = _zc(interface)
    names: set[str] = set()
    seen = threading.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:  # fmt: skip
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
    finally:
        browser.cancel()
        zc.close()
    return sorted(found.values(), key=lambda r: (r.load, r.id))
