"""The edge table: zeroconf and status merge per edge; junk status messages are ignored."""

from __future__ import annotations

import json

import pytest

from device_agent.candidates import Candidates


def _status(edge: str, state: str = "online", **extra: object) -> bytes:
    return json.dumps(
        {
            "edge": edge,
            "state": state,
            "broker": "mqtt://127.0.0.1:1884",
            "load": {"queue_ms": 12.5},
            **extra,
        }
    ).encode()


def test_status_and_zeroconf_merge_into_one_entry() -> None:
    c = Candidates()
    c.seen("b", "127.0.0.1:1884", "zeroconf", load=0.5)
    got = c.from_status(_status("b"))
    assert got is not None
    e = c.get("b")
    assert e is not None and e.sources == {"zeroconf", "status"}
    assert e.broker == "mqtt://127.0.0.1:1884" and e.queue_ms == 12.5 and e.load == 0.5


def test_offline_status_and_zeroconf_removal_mark_the_edge_offline() -> None:
    c = Candidates()
    c.from_status(_status("b"))
    c.from_status(_status("b", "offline"))
    assert c.get("b") is not None and not c.get("b").online  # type: ignore[union-attr]
    c.seen("z", "127.0.0.1:1884", "zeroconf")  # known by zeroconf alone
    assert c.gone("z") and not c.get("z").online  # type: ignore[union-attr]
    assert not c.gone("never-seen")  # nothing to mark
    assert [e.id for e in c.all()] == ["b", "z"]


def test_an_mdns_goodbye_alone_does_not_drop_an_edge_whose_status_says_online() -> None:
    """Anyone on the link can send an mDNS goodbye; the edge's retained status (written only by
    that edge on a secured broker) still saying online keeps it online."""
    c = Candidates()
    c.seen("b", "127.0.0.1:1884", "zeroconf")
    c.from_status(_status("b"))
    assert not c.gone("b")
    e = c.get("b")
    assert e is not None and e.online and e.sources == {"status"}
    c.from_status(_status("b", "offline"))  # the edge itself says so: offline
    assert not c.get("b").online  # type: ignore[union-attr]


def test_edges_outside_the_allow_list_are_never_candidates() -> None:
    c = Candidates(["a"])
    with pytest.raises(ValueError, match="allowed edges"):
        c.seen("evil", "127.0.0.1:1884", "zeroconf")
    assert c.from_status(_status("evil")) is None
    c.seen("a", "127.0.0.1:1884", "config")
    assert [e.id for e in c.all()] == ["a"] and not c.allows("evil")
    assert Candidates(["*"]).allows("anyone") and Candidates().allows("anyone")


def test_junk_status_is_ignored() -> None:
    c = Candidates()
    for junk in (
        b"not json",
        b"[]",
        json.dumps({"edge": 3}).encode(),
        json.dumps({"edge": "x", "state": "weird", "broker": "b"}).encode(),
        json.dumps({"edge": "x", "state": "online"}).encode(),  # no broker
        json.dumps({"edge": "x", "state": "online", "broker": "ftp://h"}).encode(),
    ):
        assert c.from_status(junk) is None
    assert c.all() == []


def test_a_device_with_credentials_never_takes_an_edge_on_a_plain_broker() -> None:
    """A spoofed zeroconf record (or status) naming mqtt://: the device's credentials and
    tensors would go to a broker nobody verified."""
    c = Candidates(require_tls=True)
    with pytest.raises(ValueError, match="TLS"):
        c.seen("e1", "mqtt://127.0.0.1:1883", "zeroconf")
    assert c.seen("e1", "mqtts://127.0.0.1:8883", "zeroconf").broker == "mqtts://127.0.0.1:8883"
