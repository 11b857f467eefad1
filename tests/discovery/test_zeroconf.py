"""Real zeroconf on 127.0.0.1 (the suite's interface, set once in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

from iotoffload.discovery import EdgeAdvertiser, browse_edges

pytestmark = pytest.mark.integration
IFACE = os.environ["IOTOFFLOAD_INTERFACE"]


def test_advertised_edges_are_found_least_loaded_first() -> None:
    a = EdgeAdvertiser("zc-edge-a", "mqtt://127.0.0.1:1999", IFACE)
    b = EdgeAdvertiser("zc-edge-b", "mqtt://127.0.0.1:2999", IFACE)
    a.register(0.9)
    b.register(0.1)
    try:
        found = [r for r in browse_edges(IFACE, 5, want=2) if r.id.startswith("zc-edge")]
        assert [r.id for r in found] == ["zc-edge-b", "zc-edge-a"]
        assert found[0].broker == "mqtt://127.0.0.1:2999" and found[0].address == IFACE
    finally:
        a.close()
        b.close()
    assert not [r for r in browse_edges(IFACE, 1.0) if r.id.startswith("zc-edge")]


def test_interface_must_be_an_address() -> None:
    with pytest.raises(OSError):
        browse_edges("not-an-address", 0.1)


def test_a_taken_edge_id_is_a_clear_error() -> None:
    a = EdgeAdvertiser("zc-dup", "mqtt://127.0.0.1:1999", IFACE)
    a.register()
    try:
        with pytest.raises(ValueError, match="already advertised"):
            EdgeAdvertiser("zc-dup", "mqtt://127.0.0.1:2999", IFACE).register()
    finally:
        a.close()
