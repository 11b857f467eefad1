"""Real brokers on loopback: the embedded amqtt broker and a real mosquitto."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.embedded import EmbeddedBroker, free_port


def _mosquitto(tmp: Path) -> Iterator[str]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size 16777216\n"
        "persistence false\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)


@dataclass(frozen=True)
class BrokerUnderTest:
    url: str
    protocol: int  # MQTT 5 or 3.1.1 (311) for every client of the test


@pytest.fixture(params=["embedded-v311", "mosquitto-v5", "mosquitto-v311"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerUnderTest]:
    kind, proto = request.param.split("-v")
    if kind == "embedded":  # amqtt speaks 3.1.1 only
        with EmbeddedBroker() as b:
            yield BrokerUnderTest(b.url, int(proto))
    else:
        for url in _mosquitto(tmp_path):
            yield BrokerUnderTest(url, int(proto))
