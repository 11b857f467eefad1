"""The MQTT topic tree, protocol v2 (prefix configurable, default ``iotoffload/v2``).

Every topic a client publishes on ends in (or, for the topics an agent owns, is rooted at) the
publisher's own identity, so a broker ACL can bind each topic to the authenticated client
(mosquitto ``user``/``pattern`` with ``%u``, EMQX ``${username}``, AWS IoT
``${iot:ClientId}``) and a receiver knows who sent a message from its topic alone::

    {p}/edges/{edge}/status                 retained status      written by {edge}
    {p}/edges/{edge}/control/{sender}       hello, announce,     written by the device or
                                            transfer, peer_fetch the peer edge {sender}
    {p}/edges/{edge}/upload/{sender}        upload chunks        device / pushing peer edge
    {p}/edges/{edge}/query/{sender}         queries              device or app {sender}
    {p}/devices/{device}/inbox/{edge}       results, errors,     written by {edge}
                                            inventories, acks
    {p}/devices/{device}/control/{op}       {"prefer": …}        written by operator {op}
    {p}/devices/{device}/results            the device's results written by {device}

An identity is an agent id (``ID_PATTERN``) and, on a secured broker, the MQTT username (the
certificate's CN with client certificates).
"""

from __future__ import annotations

from dataclasses import dataclass

from iotoffload.ids import ID_PATTERN, check_id, is_id

__all__ = ["ANY", "DEFAULT_PREFIX", "ID_PATTERN", "PROTOCOL_VERSION", "Topics", "check_id", "is_id"]
PROTOCOL_VERSION = 2
DEFAULT_PREFIX = f"iotoffload/v{PROTOCOL_VERSION}"
ANY = "+"  # the single-level wildcard, for subscriptions


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    # edges -----------------------------------------------------------------------------------
    def edge_status(self, edge: str) -> str:
        return f"{self.prefix}/edges/{edge}/status"

    def edge_status_all(self) -> str:
        return f"{self.prefix}/edges/{ANY}/status"

    def edge_control(self, edge: str, sender: str) -> str:
        """hello / announce / transfer (devices) and peer_fetch (peer edges)."""
        return f"{self.prefix}/edges/{edge}/control/{sender}"

    def edge_upload(self, edge: str, sender: str) -> str:
        return f"{self.prefix}/edges/{edge}/upload/{sender}"

    def edge_query(self, edge: str, sender: str) -> str:
        return f"{self.prefix}/edges/{edge}/query/{sender}"

    # devices ---------------------------------------------------------------------------------
    def device_inbox(self, device: str, edge: str) -> str:
        return f"{self.prefix}/devices/{device}/inbox/{edge}"

    def device_control(self, device: str, operator: str) -> str:
        """JSON commands to a running device agent, e.g. {"prefer": "edge-b"} (handoff)."""
        return f"{self.prefix}/devices/{device}/control/{operator}"

    def device_results(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/results"

    # receivers ---------------------------------------------------------------------------------
    def sender(self, topic: str) -> str | None:
        """The identity a message's topic names as its sender (its last level), or None when
        the topic is not one of this tree's addressed topics or the level is not an id."""
        if not topic.startswith(self.prefix + "/"):
            return None
        levels = topic[len(self.prefix) + 1 :].split("/")
        if len(levels) != 4 or levels[0] not in ("edges", "devices"):
            return None
        if levels[2] not in ("control", "upload", "query", "inbox"):
            return None
        who = levels[3]
        return who if is_id(who) else None

    def status_owner(self, topic: str) -> str | None:
        """The edge a status topic belongs to (its only writer on a secured broker)."""
        if not topic.startswith(self.prefix + "/edges/") or not topic.endswith("/status"):
            return None
        who = topic[len(self.prefix) + len("/edges/") : -len("/status")]
        return who if is_id(who) else None
