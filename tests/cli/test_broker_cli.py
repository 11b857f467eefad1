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
