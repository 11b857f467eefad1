"""``edge-agent``: serve offloaded DNN blocks to nearby devices."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from broker.embedded import EmbeddedBroker, InsecureBindError
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from edge_agent.trust import ModelTrust
from iotoffload.cli._console import console, err_console
from iotoffload.cli._security import (
    CaFile,
    CertFile,
    KeyFile,
    PasswordFile,
    TlsInsecure,
    Username,
    load_security,
)
from iotoffload.runtime.onnx import check_providers
from iotoffload.transport.mqtt import BrokerAuthError, BrokerUnavailableError

app = typer.Typer(
    add_completion=False, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False
)


@app.callback()
def _root() -> None:
    """Serve offloaded DNN blocks to nearby devices."""


@app.command()
def start(
    config: Annotated[Path | None, typer.Option(help="TOML file with an \\[edge] table.")] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            help="mqtt://HOST:PORT or mqtts://HOST:PORT of the broker (a clustered broker: its "
            "nodes, comma-separated); without it the embedded broker is started on "
            "--interface:--port."
        ),
    ] = None,
    edge_id: Annotated[str | None, typer.Option("--id", help="Edge id (a topic level).")] = None,
    store: Annotated[Path | None, typer.Option(help="Block store directory.")] = None,
    interface: Annotated[
        str | None,
        typer.Option(
            help="Address to advertise on (and bind the embedded broker to). Default: 127.0.0.1.",
        ),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Embedded broker port. Default: 1883.")] = None,
    no_advertise: Annotated[
        bool, typer.Option("--no-advertise", help="Do not register with zeroconf.")
    ] = False,
    protocol: Annotated[int | None, typer.Option(help="MQTT 5 or 311.")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads per query.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Worker processes (each its own ONNX Runtime process) running queries or "
            "batches in parallel. Default 0: one per usable core less one."
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(
            help="Queries of the same model and blocks (from any devices) run as one batch, "
            "up to this many; 1: no batching. Default: 8."
        ),
    ] = None,
    batch_delay_ms: Annotated[
        float | None,
        typer.Option(
            help="How long a worker waits for a batch to fill. Default 0: batches form only "
            "from queries already queued (under load), adding no wait."
        ),
    ] = None,
    provider: Annotated[
        list[str] | None,
        typer.Option(
            help="ONNX Runtime execution provider, in order of preference; repeat it "
            "(--provider CUDAExecutionProvider --provider CPUExecutionProvider). Default: CPU.",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve Prometheus metrics on this port (http://ADDRESS:PORT/metrics; "
            "metrics_address in the config, default 127.0.0.1). Default: off.",
        ),
    ] = None,
    worker_memory_mb: Annotated[
        int | None,
        typer.Option(
            help="Address-space cap of each worker process (MiB); a block over it is "
            "quarantined. Default: 3072.",
        ),
    ] = None,
    require_signed: Annotated[
        bool | None,
        typer.Option(
            "--require-signed/--no-require-signed",
            help="Serve only models signed (`iotoffload model sign`) by a --trusted-key.",
        ),
    ] = None,
    trusted_key: Annotated[
        list[Path] | None,
        typer.Option(
            help="An ed25519 public key (PEM, from `iotoffload model keygen`) whose signed "
            "models this edge serves (repeatable).",
        ),
    ] = None,
    peer_broker: Annotated[
        list[str] | None,
        typer.Option(
            help="Handoff: a peer edge's broker this edge may pull blocks from (repeatable; "
            "its own broker is always allowed; '*' allows any).",
        ),
    ] = None,
    peer_edge: Annotated[
        list[str] | None,
        typer.Option(
            help="Handoff: a peer edge (by id) this edge exchanges blocks with, pushing to it "
            "and pulling from it (repeatable; none by default; '*' allows any edge).",
        ),
    ] = None,
    ca_file: CaFile = None,
    cert_file: CertFile = None,
    key_file: KeyFile = None,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_insecure: TlsInsecure = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Start the edge agent and serve until Ctrl-C (or SIGTERM).

    A secured broker: --broker mqtts://HOST:8883 with --ca-file, and --username with
    --password-file, or --cert-file/--key-file (or the \\[mqtt] table of --config).
    Every hardening limit (worker memory and time, screening caps, store quotas, queue
    bounds, deadline cap) is a key of the \\[edge] table: README "Hardening"."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = EdgeConfig.load(
            config,
            broker=broker,
            id=edge_id,
            store=store,
            interface=interface,
            embedded_broker_port=port,
            advertise=False if no_advertise else None,
            protocol=protocol,
            threads=threads,
            workers=workers,
            max_batch=max_batch,
            batch_delay_ms=batch_delay_ms,
            providers=provider or None,
            metrics_port=metrics_port,
            worker_memory_mb=worker_memory_mb,
            peer_brokers=peer_broker or None,
            peer_edges=peer_edge or None,
            require_signed=require_signed,
            trusted_keys=trusted_key or None,
        )
        ModelTrust.from_config(cfg)  # a missing or bad trusted key: a config error, now
        check_providers(cfg.providers)  # a GPU provider this ONNX Runtime lacks: now too
        security = load_security(
            config,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            username=username,
            password_file=password_file,
            tls_insecure=tls_insecure,
        )
        who = security.identity()
        if "id" not in cfg.model_fields_set and who:  # protocol v2: my id is my identity
            cfg = cfg.model_copy(update={"id": who})
    except (ValueError, OSError) as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from e
    embedded = None
    url = cfg.broker
    if url is None:
        try:
            embedded = EmbeddedBroker(cfg.interface, cfg.embedded_broker_port)
            embedded.start()
        except (RuntimeError, InsecureBindError) as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from e
        url = embedded.url
        cfg = cfg.model_copy(update={"protocol": 311})  # amqtt speaks MQTT 3.1.1
    agent = EdgeAgent(cfg, security)
    # installed before the start: a SIGTERM the moment the edge is online (its status is
    # retained, so a supervisor may act on it at once) still stops it cleanly
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.start(url)
    except (BrokerUnavailableError, BrokerAuthError, ValueError) as e:
        err_console.print(f"[bold red]error:[/] {e}")
        if embedded:
            embedded.stop()
        raise typer.Exit(2) from e
    console.print(
        f"edge [bold]{cfg.id}[/] serving on {url} (MQTT {cfg.protocol}"
        f"{', embedded broker' if embedded else ''}); store {cfg.store}; "
        f"{'advertised on ' + cfg.interface if cfg.advertise else 'not advertised'}"
        + (
            f"; metrics on http://{cfg.metrics_address}:{agent.metrics_port}/metrics"
            if agent.metrics_port is not None
            else ""
        )
    )
    stop.wait()
    console.print("shutting down: publishing offline, unregistering")
    agent.stop()
    if embedded:
        embedded.stop()
    s = agent.stats
    console.print(f"served {s.queries} queries, stored {s.blocks_stored} blocks, {s.errors} errors")


def main() -> None:
    app()
