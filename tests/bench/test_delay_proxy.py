"""The delay proxy adds its delay each way and passes every byte through, in order."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np

from broker.embedded import free_port


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_proxy_delays_each_way_and_keeps_the_bytes() -> None:
    srv, target = _echo_server()
    port = free_port()
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iotoffload.bench.delay_proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--target",
            f"127.0.0.1:{target}",
            "--delay-ms",
            "60",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and "ready" in proxy.stdout.readline()
        payload = np.random.default_rng(0).bytes(1_000_000)
        with socket.create_connection(("127.0.0.1", port), 5) as c:
            t0 = time.monotonic()
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            rtt = time.monotonic() - t0
            c.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                got += c.recv(1 << 20)
        assert rtt >= 0.12  # 60 ms each way: a round trip cannot be shorter
        assert bytes(got) == payload
    finally:
        assert proxy.stdin is not None
        proxy.stdin.close()
        proxy.wait(5)
        srv.close()
