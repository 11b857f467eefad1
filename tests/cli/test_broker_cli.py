from __future__ import annotations

from pathlib import Path

from broker.mosquitto import mosquitto_config


def test_launcher_settings_match_the_shipped_config() -> None:
    shipped = {
        line.strip()
        for line in (Path(__file__).parents[2] / "configs" / "mosquitto.conf")
        .read_text()
        .splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith("listener")
    }
    launched = {ln for ln in mosquitto_config("127.0.0.1", 1).splitlines()[1:] if ln}
    assert launched == shipped
    assert mosquitto_config("127.0.0.1", 18883).splitlines()[0] == "listener 18883 127.0.0.1"


def test_the_lab_brokers_refuse_to_listen_beyond_loopback() -> None:
    """Neither the embedded broker nor the anonymous mosquitto of `iotoffload broker` has TLS,
    passwords or an ACL: both refuse a non-loopback address, with one line naming the way out."""
    import pytest
    from typer.testing import CliRunner

    from broker.embedded import EmbeddedBroker, InsecureBindError, is_loopback
    from iotoffload.cli import app

    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    with pytest.raises(InsecureBindError, match="security init"):
        EmbeddedBroker("0.0.0.0", 1)
    EmbeddedBroker("10.200.0.1", 1, isolated_network=True)  # the bench's own namespace: allowed
    for extra in ([], ["--mosquitto"]):
        r = CliRunner().invoke(app, ["broker", "--host", "0.0.0.0", *extra])
        assert r.exit_code == 2 and "security init" in r.output, r.output
