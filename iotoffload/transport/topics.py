"""The MQTT topic tree (prefix configurable, default ``iotoffload/v1``)."""

from __future__ import annotations

from dataclasses import dataclass

from iotoffload.ids import ID_PATTERN, check_id, is_id

__all__ = ["DEFAULT_PREFIX", "ID_PATTERN", "Topics", "check_id", "is_id"]
DEFAULT_PREFIX = "iotoffload/v1"


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def edge_status(self, edge: str) -> str:
        return f"{self.prefix}/edges/{edge}/status"

    def edge_status_all(self) -> str:
        return f"{self.prefix}/edges/+/status"

    def edge_upload(self, edge: str) -> str:
        return f"{self.prefix}/edges/{edge}/upload"

    def edge_query(self, edge: str) -> str:
        return f"{self.prefix}/edges/{edge}/query"

    def edge_control(self, edge: str) -> str:
        """hello / announce: small control frames."""
        return f"{self.prefix}/edges/{edge}/control"

    def device_inbox(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/inbox"

    def device_control(self, device: str) -> str:
        """JSON commands to a running device agent, e.g. {"prefer": "edge-b"} (handoff)."""
        return f"{self.prefix}/devices/{device}/control"

    def device_results(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/results"
