"""Launching mosquitto with the settings the protocol needs (see configs/mosquitto.conf)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def mosquitto_exe() -> str | None:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return exe if Path(exe).exists() else None


@contextmanager
def mosquitto_running(host: str, port: int, timeout: float = 10.0) -> Iterator[str]:
    """A mosquitto of our own on host:port until the block ends; yields its URL once it
    accepts connections."""
    exe = mosquitto_exe()
    if exe is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "mosquitto.conf"
        conf.write_text(mosquitto_config(host, port))
        proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    socket.create_connection((host, port), 0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > end:
                        raise RuntimeError(f"mosquitto did not start on {host}:{port}") from None
                    time.sleep(0.05)
            yield f"mqtt://{host}:{port}"
        finally:
            proc.terminate()
            proc.wait(5)


def run_mosquitto(host: str = "127.0.0.1", port: int = 1883) -> int:
    """Run mosquitto in the foreground; returns its exit code (2 when it is not installed)."""
    exe = mosquitto_exe()
    if exe is None:
        print("error: mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        return 2
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "mosquitto.conf"
        conf.write_text(mosquitto_config(host, port))
        try:
            return subprocess.call([exe, "-c", str(conf)])
        except KeyboardInterrupt:
            return 0
