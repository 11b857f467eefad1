"""The shipped config examples load as they are (a key renamed in code breaks them here)."""

from __future__ import annotations

from pathlib import Path

from device_agent.config import DeviceConfig
from edge_agent.config import EdgeConfig
from iotoffload.cli._security import load_security

CONFIGS = Path(__file__).parents[1] / "configs"


def test_the_shipped_configs_load() -> None:
    d = DeviceConfig.load(CONFIGS / "device.toml")
    assert d.edges == ["*"] and d.operators == ["*"] and d.prefix == "iotoffload/v2"
    e = EdgeConfig.load(CONFIGS / "edge.toml")
    assert e.peer_edges == [] and e.prefix == "iotoffload/v2"
    for f in ("device.toml", "edge.toml"):
        sec = load_security(
            CONFIGS / f,
            ca_file=None,
            cert_file=None,
            key_file=None,
            username=None,
            password_file=None,
            tls_insecure=False,
        )
        assert not sec.uses_tls_settings
