"""``iotoffload status``: the edges on a broker as their retained statuses show them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.filesize import decimal
from rich.markup import escape
from rich.table import Table
from rich.text import Text

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
from iotoffload.client import AppClient
from iotoffload.transport.mqtt import BrokerAuthError, BrokerUnavailableError
from iotoffload.transport.status import EdgeStatus
from iotoffload.transport.topics import DEFAULT_PREFIX


def _age(t: float, now: float) -> str:
    if t <= 0:
        return "?"
    s = max(0.0, now - t)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def _providers(s: EdgeStatus) -> Text:
    """The configured providers, each one the sessions do not run on struck out (none are
    before a block is loaded, or from an edge older than ``providers_in_use``). Built as
    Text, never parsed as markup: a status is a stranger's until proven otherwise."""
    names = []
    for p in s.providers:
        idle = bool(s.providers_in_use) and p not in s.providers_in_use
        names.append(Text(p.removesuffix("ExecutionProvider"), style="strike red" if idle else ""))
    return Text(",").join(names)


def table(edges: list[EdgeStatus], now: float) -> Table:
    """Compact enough for 80 columns; ``--json`` has every field."""
    t = Table(
        title=f"{len(edges)} edge{'s' * (len(edges) != 1)}",
        caption="load: queued+running; ms: mean wait/run; dev: devices in the last minute; "
        "quar: quarantined blocks; prov: execution providers (configured; one ONNX Runtime "
        "did not start for the sessions struck out)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    t.add_column("edge", no_wrap=True)
    t.add_column("state", no_wrap=True)
    for col in ("models", "blocks", "store", "load", "ms", "dev", "quar"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("prov", no_wrap=True)
    t.add_column("age", justify="right", no_wrap=True)
    for s in edges:
        t.add_row(
            s.edge,
            "[green]online[/]" if s.state == "online" else "[red]offline[/]",
            str(s.models_total),
            str(s.blocks),
            decimal(s.store.bytes),
            f"{s.load.queue}+{s.load.in_flight}",
            f"{s.load.queue_ms:.1f}/{s.load.exec_ms:.1f}",
            str(s.devices),
            str(s.store.quarantined),
            _providers(s),
            _age(s.time, now),
        )
    return t


def status(
    broker: Annotated[
        str,
        typer.Option(
            help="mqtt://HOST:PORT or mqtts://HOST:PORT (a cluster: nodes, comma-separated)"
        ),
    ] = "mqtt://127.0.0.1:1883",
    wait: Annotated[
        float, typer.Option(min=0.1, max=60, help="Seconds to collect retained statuses.")
    ] = 1.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per edge instead of the table.")
    ] = False,
    models: Annotated[
        bool, typer.Option(help="List each online edge's models (asks each edge).")
    ] = False,
    config: Annotated[
        Path | None, typer.Option(help="TOML file whose [mqtt] table gives the credentials.")
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option("--id", help="Client id (default: the credentials' identity, else app-…)."),
    ] = None,
    prefix: Annotated[str, typer.Option(help="Topic prefix.")] = DEFAULT_PREFIX,
    protocol: Annotated[int, typer.Option(help="MQTT 5 or 311.")] = 5,
    ca_file: CaFile = None,
    cert_file: CertFile = None,
    key_file: KeyFile = None,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_insecure: TlsInsecure = False,
) -> None:
    """The edges on a broker, from their retained statuses: state, models, blocks and bytes
    stored, load (queued + running, the mean wait and run times), devices heard from in the
    last minute, quarantined blocks, execution providers, the status's age (`--json`: every
    field, the version too). On a secured broker, run
    it with an app's or operator's credentials (`--config` an agent file of `security init`)."""
    try:
        security = load_security(
            config,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            username=username,
            password_file=password_file,
            tls_insecure=tls_insecure,
        )
        client = AppClient(broker, client_id, security=security, prefix=prefix, protocol=protocol)
    except ValueError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from e
    try:
        client.connect()
    except (BrokerAuthError, BrokerUnavailableError) as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from e
    try:
        time.sleep(wait)  # retained statuses arrive right after the subscription
        edges = client.edges(0, offline=True)
        listed: dict[str, list[str]] = {}
        if models:
            for s in edges:
                if s.state == "online":
                    try:
                        listed[s.edge] = client.models(s.edge)
                    except TimeoutError:
                        listed[s.edge] = s.models
    finally:
        client.close()
    if as_json:
        for s in edges:
            doc = json.loads(s.to_json())
            if s.edge in listed:
                doc["models"] = listed[s.edge]
            # one line each, printed as is: a status is a stranger's text
            print(json.dumps(doc, separators=(",", ":")))
        if not edges:
            raise typer.Exit(1)
        return
    if not edges:
        console.print(f"no edge has a status on {broker} (prefix {prefix}) within {wait:g} s")
        raise typer.Exit(1)
    console.print(table(edges, time.time()))
    for edge, ids in listed.items():
        console.print(f"[bold]{escape(edge)}[/]: {len(ids)} models")
        for m in ids:
            console.print(f"  {escape(m)}")
