"""Bench helper: an embedded broker and an edge agent on one address, until stdin closes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from broker.embedded import EmbeddedBroker
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--id", default="bench-edge")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with EmbeddedBroker(a.host, a.port) as b:
        edge = EdgeAgent(EdgeConfig(id=a.id, broker=b.url, store=a.store, advertise=False,
                                    protocol=311, workers=a.workers))  # fmt: skip
        edge.start()
        print(json.dumps({"ready": True, "broker": b.url}), flush=True)
        sys.stdin.read()  # the bench closes stdin to stop us
        edge.stop()


if __name__ == "__main__":
    main()
