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


def test_the_edge_example_names_every_setting() -> None:
    """configs/edge.toml documents every key of the edge (README "Hardening" points there),
    each at its default."""
    import tomllib

    shipped = tomllib.loads((CONFIGS / "edge.toml").read_text())["edge"]
    # commented out in the file (their default, none, has no TOML spelling)
    missing = set(EdgeConfig.model_fields) - set(shipped) - {"broker", "metrics_port"}
    assert not missing, f"configs/edge.toml lacks {sorted(missing)}"
    defaults = EdgeConfig(store=Path("/tmp/x"))
    for key in (
        "worker_memory_mb",
        "run_time_limit_s",
        "store_max_bytes",
        "queue_total",
        "max_deadline_ms",
        "max_chunks",
        "require_signed",
    ):
        assert shipped[key] == getattr(defaults, key), key
