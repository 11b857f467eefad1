"""Bench helper: a broker (mosquitto when installed, else the embedded one) and an edge agent
on one address, until stdin closes. mosquitto runs in its own process: the embedded broker
shares this process (and its GIL) with the edge, which starves it while a 100 MB model is
stored and loaded (PUBACK timeouts, dropped acks)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.embedded import EmbeddedBroker
from broker.mosquitto import mosquitto_exe, mosquitto_running
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig


@contextmanager
def _broker(host: str, port: int) -> Iterator[str]:
    if mosquitto_exe() is None:
        with EmbeddedBroker(host, port, isolated_network=True) as b:  # our own namespace
            yield b.url
        return
    with mosquitto_running(host, port) as url:
        yield url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--id", default="bench-edge")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with _broker(a.host, a.port) as url:
        edge = EdgeAgent(
            EdgeConfig(
                id=a.id, broker=url, store=a.store, advertise=False, protocol=311, workers=a.workers
            )
        )
        edge.start()
        print(json.dumps({"ready": True, "broker": url}), flush=True)
        sys.stdin.read()  # the bench closes stdin to stop us
        edge.stop()


if __name__ == "__main__":
    main()
