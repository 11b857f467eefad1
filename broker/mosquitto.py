"""Launching mosquitto with the settings the protocol needs (see configs/mosquitto.conf)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# Kept in step with configs/mosquitto.conf: the packet cap must fit a frame (an upload chunk or
# a boundary tensor), and queries are latency-bound (no Nagle delay).
SETTINGS = """\
listener {port} {host}
allow_anonymous true
max_packet_size 16777216
max_queued_messages 1000
set_tcp_nodelay true
persistence false
"""


def mosquitto_config(host: str, port: int) -> str:
    return SETTINGS.format(host=host, port=port)


def run_mosquitto(host: str = "127.0.0.1", port: int = 1883) -> int:
    """Run mosquitto in the foreground; returns its exit code (2 when it is not installed)."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        print("error: mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        return 2
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "mosquitto.conf"
        conf.write_text(mosquitto_config(host, port))
        try:
            return subprocess.call([exe, "-c", str(conf)])
        except KeyboardInterrupt:
            return 0
