"""``device-agent``: run a model's queries on this device with the help of a nearby edge.

The device runs blocks [0, K) with TFLite, sends the boundary tensor to the edge, which runs
[K, N) with ONNX Runtime. While the model uploads (in the background, in chunks) queries the
edge cannot serve yet run locally; a query whose answer misses its deadline finishes locally.
Every query gets exactly one answer.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from device_agent.agent import DeviceAgent
from device_agent.config import DeviceConfig
from device_agent.session import NoEdgeError, SessionSummary, find_edge, iter_inputs, run_session
from iotoffload.cli._console import console, err_console, rich_progress
from iotoffload.cli._security import (
    CaFile,
    CertFile,
    KeyFile,
    PasswordFile,
    TlsInsecure,
    Username,
    load_security,
)
from iotoffload.model.cache import ModelCache
from iotoffload.model.errors import ModelError
from iotoffload.model.weights import UploadChoice
from iotoffload.transport.mqtt import BrokerAuthError, BrokerUnavailableError

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


def summary_table(s: SessionSummary, title: str = "session summary") -> Table:
    d = s.as_dict()
    t = Table(title=title)
    for col in ("queries", "edge", "local", "mean ms", "p95 ms", "up MB", "up s", "1st edge"):
        t.add_column(col, justify="right")
    t.add_row(
        str(d["queries"]),
        str(d["offloaded"]),
        str(d["local"]),
        f"{d['mean_ms']:.2f}",
        f"{d['p95_ms']:.2f}",
        f"{d['bytes_uploaded'] / 1e6:.2f}",
        "-" if d["upload_s"] is None else f"{d['upload_s']:.2f}",
        "-" if d["first_offloaded_query"] is None else f"#{d['first_offloaded_query']}",
    )
    return t


@app.command()
def main_command(
    model: Annotated[
        str | None,
        typer.Option(help="Package name (built on first use) or directory. [default: mobilenet]"),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with a \\[device] table.")] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            help="mqtt://HOST:PORT or mqtts://HOST:PORT (a clustered broker: its nodes, "
            "comma-separated); skips zeroconf."
        ),
    ] = None,
    edge: Annotated[str | None, typer.Option(help="Edge id, or auto.")] = None,
    interface: Annotated[
        str | None, typer.Option(help="Address zeroconf browses on. Default: 127.0.0.1.")
    ] = None,
    input: Annotated[
        str,
        typer.Option(
            "--input",
            help="synthetic | an image or .npy file | a folder of them (an image offloaded "
            "from block 0 goes to the edge as its uint8 pixels)",
        ),
    ] = "synthetic",
    count: Annotated[int, typer.Option(min=1, max=100000, help="Queries to run.")] = 10,
    interval: Annotated[float, typer.Option(min=0, help="Seconds between queries.")] = 0.0,
    split: Annotated[
        str | None,
        typer.Option(
            help="K: TFLite runs blocks [0,K), the edge [K,N), fixed. Default auto: the planner "
            "decides per query from measured speeds, bandwidth and the edge's load."
        ),
    ] = None,
    planner: Annotated[
        str | None,
        typer.Option(
            help="auto (default) | local | edge | neurosurgeon | ionn | efficiency | loadpart"
        ),
    ] = None,
    objective: Annotated[str | None, typer.Option(help="latency (default) | energy | mix")] = None,
    min_local: Annotated[
        int | None,
        typer.Option(
            help="Privacy: blocks that always run on the device (raw input never leaves it)."
        ),
    ] = None,
    edge_speed: Annotated[
        float | None,
        typer.Option(
            help="Edge speed ÷ device speed until the edge reports its own times. Default 1."
        ),
    ] = None,
    reprofile: Annotated[
        bool, typer.Option(help="Measure the device's block times again.")
    ] = False,
    deadline_ms: Annotated[
        float | None,
        typer.Option(
            help="Per-query deadline; default about twice the local time of the rear part."
        ),
    ] = None,
    protocol: Annotated[int | None, typer.Option(help="MQTT 5 or 311.")] = None,
    device_id: Annotated[str | None, typer.Option("--id", help="Device id.")] = None,
    wait_upload: Annotated[bool, typer.Option(help="Finish the upload before querying.")] = False,
    handoff: Annotated[
        bool | None,
        typer.Option(
            "--handoff/--no-handoff",
            help="Move to another edge when mine goes offline, its round trip or deadline "
            "misses cross a limit, or another is predicted faster for a while (default on).",
        ),
    ] = None,
    prefer: Annotated[
        str | None,
        typer.Option(
            help="Stay on this edge whenever it is online; change it at run time with "
            'a {"prefer": EDGE} message on PREFIX/devices/ID/control.'
        ),
    ] = None,
    transfer: Annotated[
        bool | None,
        typer.Option(
            "--transfer/--no-transfer",
            help="At a move, the new edge fetches my blocks from the old one over the "
            "backhaul (default on); otherwise I upload them again.",
        ),
    ] = None,
    proactive: Annotated[
        bool | None,
        typer.Option(
            "--proactive/--no-proactive",
            help="Once my edge has the model, fill the likely next edge in the "
            "background (default off).",
        ),
    ] = None,
    upload_mbps: Annotated[
        float | None, typer.Option(help="Cap my own upload at this many Mbit/s.")
    ] = None,
    upload_weights: Annotated[
        str | None,
        typer.Option(
            help="Weights to upload: auto (default: the smallest form the package build "
            "verified, top-1 agreement with float32 >= 99 %; derived once, on first use) | "
            "float32 | float16 | int8."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per query.")] = False,
    ca_file: CaFile = None,
    cert_file: CertFile = None,
    key_file: KeyFile = None,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_insecure: TlsInsecure = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run MODEL's queries on this device with the help of a nearby edge.

    The device runs blocks [0, K) with TFLite and sends the boundary tensor; the edge runs
    [K, N) with ONNX Runtime. While the model uploads (in the background, in chunks) queries
    the edge cannot serve yet run locally; a query whose answer misses its deadline finishes
    locally. Every query gets exactly one answer. Without --broker the edge is found by
    zeroconf on --interface; with --broker and --edge auto, by the edges' retained status.
    A secured broker: --broker mqtts://HOST:8883 with --ca-file, and --username with
    --password-file, or --cert-file/--key-file (or the \\[mqtt] table of --config).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    try:
        cfg = DeviceConfig.load(
            config,
            model=model,
            broker=broker,
            edge=edge,
            interface=interface,
            split=split,
            deadline_ms=deadline_ms,
            protocol=protocol,
            id=device_id,
            planner=planner,
            objective=objective,
            min_local=min_local,
            edge_speed=edge_speed,
            handoff=handoff,
            prefer=prefer,
            transfer=transfer,
            proactive=proactive,
            upload_mbps=upload_mbps,
            upload_weights=upload_weights,
        )
        security = load_security(
            config,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            username=username,
            password_file=password_file,
            tls_insecure=tls_insecure,
        )
        with rich_progress() as progress:
            form = cast("UploadChoice", cfg.upload_weights)  # checked by the config's pattern
            pkg = ModelCache.from_settings().resolve(
                cfg.model, progress=progress, upload_weights=form
            )
        url, edge_id = find_edge(cfg, security)
        agent = DeviceAgent(
            pkg,
            url,
            edge_id,
            device_id=cfg.id or security.identity(),
            protocol=cfg.protocol,
            prefix=cfg.prefix,
            split=None if cfg.split == "auto" else int(cfg.split),
            chunk_size=cfg.chunk_bytes,
            deadline_ms=cfg.deadline_ms,
            tflite_threads=cfg.tflite_threads,
            planner=cfg.planner,
            objective=cfg.objective,  # type: ignore[arg-type]
            min_local=cfg.min_local,
            edge_speed=cfg.edge_speed,
            reprofile=reprofile,
            handoff=cfg.policy(),
            interface=cfg.interface,
            prefer=cfg.prefer,
            transfer=cfg.transfer,
            proactive=cfg.proactive,
            proactive_rate_Bps=cfg.proactive_mbps * 1e6 / 8,
            upload_rate_Bps=None if cfg.upload_mbps is None else cfg.upload_mbps * 1e6 / 8,
            security=security,
            allowed_edges=cfg.edges,
            operators=cfg.operators,
        )
        try:
            inv = agent.connect()
        except BaseException:
            agent.close()
            raise
    except (ModelError, NoEdgeError, BrokerUnavailableError, BrokerAuthError, ValueError) as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from e
    if inv is None:
        err_console.print(f"[yellow]edge {edge_id} does not answer: running locally[/]")
    fixed = agent.fixed_split
    how = f"fixed split {fixed}" if fixed is not None else f"planner {agent.planner.name}"
    missing = sum(b.upload_bytes for b in pkg.blocks if b.index not in (inv.stored if inv else []))
    err_console.print(
        f"device {agent.device_id} → edge {edge_id} at {url}; {how}; "
        f"{missing / 1e6:.1f} MB to upload"
    )
    bar = Progress(
        TextColumn("uploading"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=False,
        disable=as_json,
    )
    task = bar.add_task("upload", total=missing)

    def on_query(rec: dict[str, object]) -> None:
        if as_json:
            print(json.dumps(rec), flush=True)
        else:
            where = f"edge {rec['edge']}" if rec["offloaded"] else "local"
            bar.console.print(
                f"#{rec['query']:<4} {rec['top1']!s:<20} {rec['latency_ms']:>8.2f} ms "
                f"(pred {rec['predicted_ms']:.1f}) {where} {rec['plan']}  ({rec['reason']})"
            )

    try:
        with bar:
            summary = run_session(
                agent,
                iter_inputs(input, pkg, count),
                interval=interval,
                on_query=on_query,
                on_upload=lambda _b, n: bar.advance(task, n),
                wait_upload=wait_upload,
            )
    except ModelError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from e
    finally:
        agent.close()
    if as_json:
        print(json.dumps(summary.as_dict()), flush=True)
    else:
        console.print(summary_table(summary))
        for h in summary.handoffs:
            console.print(
                f"handoff {h['from']} → {h['to']} at +{h['at_s']:.1f} s ({h['reason']}): "
                f"it held {h['had']} blocks, {h['transfer']} by edge-to-edge transfer"
            )
        if pkg.manifest.weights == "seeded":
            console.print("[yellow]seeded random weights: the labels above mean nothing[/]")


def main() -> None:
    app()
