"""Bench helper: a broker (mosquitto when installed, else the embedded one) and an edge agent
on one address, until stdin closes. mosquitto runs in its own process: the embedded broker
shares this process (and its GIL) with the edge, which starves it while a 100 MB model is
stored and loaded (PUBACK timeouts, dropped acks). With ``--lab DIR`` the broker is the
secured setup of ``iotoffload security init`` written to DIR for this address (TLS, a client
certificate per bench agent, the ACL) and the edge connects as ``bench-edge``. With
``--broker URL`` the edge connects to a broker already running there (its credentials from
``--lab DIR`` when that broker is secured) and starts none: a bench that runs its device in
its own process then measures the two as deployed, each with an interpreter of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.embedded import EmbeddedBroker, EmbeddedSecurity
from broker.mosquitto import mosquitto_exe, mosquitto_running
from broker.secured import SecuredBroker, secured_mosquitto
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.bench.scenarios import BENCH_AGENTS
from iotoffload.deploy.lab import LabPlan, init_lab
from iotoffload.transport.security import MqttSecurity


@contextmanager
def _broker(host: str, port: int, lab: Path | None) -> Iterator[tuple[str, MqttSecurity | None]]:
    """(URL, the edge's credentials or None) of the broker on host:port."""
    if lab is not None and mosquitto_exe() is not None:
        with secured_mosquitto(BENCH_AGENTS, directory=lab, host=host, port=port) as sb:
            yield sb.url, sb.security("bench-edge")
        return
    if lab is not None:
        names = list(dict.fromkeys(["127.0.0.1", "localhost", host]))
        init_lab(LabPlan(lab, BENCH_AGENTS, host=host, port=port, server_names=names))
        sec = EmbeddedSecurity.from_lab(lab)
        with EmbeddedBroker(host, port, isolated_network=True, security=sec) as b:
            yield b.url, SecuredBroker(b.url, lab).security("bench-edge")
        return
    if mosquitto_exe() is None:
        with EmbeddedBroker(host, port, isolated_network=True) as b:  # our own namespace
            yield b.url, None
        return
    with mosquitto_running(host, port) as url:
        yield url, None


@contextmanager
def _existing(url: str, lab: Path | None) -> Iterator[tuple[str, MqttSecurity | None]]:
    """The broker at ``url``, already running (the bench's): the edge's credentials from
    ``lab`` when it is secured."""
    yield url, SecuredBroker(url, lab).security("bench-edge") if lab is not None else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", help="where to start the broker (without --broker)")
    ap.add_argument("--port", type=int)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--id", default="bench-edge")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--lab", type=Path, default=None, help="secured: the setup's directory")
    ap.add_argument("--broker", default=None, help="a running broker's URL: start none")
    ap.add_argument("--protocol", type=int, default=311)
    a = ap.parse_args()
    if a.broker is None and (a.host is None or a.port is None):
        ap.error("--host and --port, or --broker")
    logging.basicConfig(level=logging.ERROR)
    started = _existing(a.broker, a.lab) if a.broker else _broker(a.host, a.port, a.lab)
    with started as (url, security):
        edge = EdgeAgent(
            EdgeConfig(
                id=a.id,
                broker=url,
                store=a.store,
                advertise=False,
                protocol=a.protocol,
                workers=a.workers,
            ),
            security,
        )
        edge.start()
        print(json.dumps({"ready": True, "broker": url}), flush=True)
        sys.stdin.read()  # the bench closes stdin to stop us
        edge.stop()


if __name__ == "__main__":
    main()
