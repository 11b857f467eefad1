"""``iotoffload broker`` and ``iotoffload demo``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated

import typer

from iotoffload.cli._console import console, err_console, rich_progress, user_errors
from iotoffload.model.cache import ModelCache
from iotoffload.model.weights import UPLOAD_CHOICES


@user_errors
def broker(
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to bind. Default: 127.0.0.1, or with --secured the setup's host.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="TCP port. Default: 1883, or with --secured the setup's TLS port.",
            show_default=False,
        ),
    ] = None,
    mosquitto: Annotated[
        bool,
        typer.Option(
            help="Run mosquitto (MQTT 5 and 3.1.1, recommended) with the project's settings "
            "instead of the embedded broker."
        ),
    ] = False,
    secured: Annotated[
        Path | None,
        typer.Option(
            help="Run the embedded broker secured with the setup `iotoffload security init "
            "DIR` wrote: TLS, an identity per agent (certificate or password) bound to its "
            "client id, the ACL by role. Then any address may be bound.",
            metavar="DIR",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run an MQTT broker for iotoffload until Ctrl-C: the embedded one (amqtt, MQTT 3.1.1),
    plain on loopback or --secured DIR on any address, or with --mosquitto a plain mosquitto
    with the settings of configs/mosquitto.conf (on a network: `mosquitto -c
    DIR/mosquitto.conf`)."""
    from broker.embedded import EmbeddedBroker, EmbeddedSecurity, is_loopback
    from broker.mosquitto import run_mosquitto

    security = None
    if secured is not None:
        if mosquitto:
            raise ValueError(f"a secured mosquitto runs as `mosquitto -c {secured}/mosquitto.conf`")
        from iotoffload.deploy.lab import LabRecord

        security = EmbeddedSecurity.from_lab(secured)
        lab = LabRecord.load(secured.expanduser().resolve())
        host, port = host or lab.host, port or lab.port
    host, port = host or "127.0.0.1", port or 1883
    if security is None and not is_loopback(host):  # no TLS or passwords
        raise ValueError(
            f"this broker lets anyone in and listens on loopback only, not on {host}; for a "
            "network, `iotoffload security init DIR ...` then `iotoffload broker --secured DIR`"
            " or `mosquitto -c DIR/mosquitto.conf`"
        )
    if mosquitto:
        raise typer.Exit(run_mosquitto(host, port))

    b = EmbeddedBroker(host, port, security=security).start()
    how = "TLS, identities, ACL" if security is not None else "anyone may connect"
    console.print(f"embedded broker listening on {b.url} (MQTT 3.1.1; {how}); Ctrl-C stops it")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    b.stop()


@user_errors
def demo(
    model: Annotated[
        str,
        typer.Option(
            help="Package name (built on first use): efficientnet-lite0 has real ImageNet weights; "
            "mobilenet is seeded when its weights cannot be downloaded."
        ),
    ] = "efficientnet-lite0",
    count: Annotated[int, typer.Option(min=1, max=10000, help="Queries.")] = 20,
    interval: Annotated[float, typer.Option(min=0, help="Seconds between queries.")] = 0.05,
    split: Annotated[
        str,
        typer.Option(
            help="K (fixed split), or auto: the planner decides. The default, 10, shows offloading "
            "on one machine, where it cannot pay off (the planner would rightly keep queries "
            "local here)."
        ),
    ] = "10",
    input: Annotated[
        str,
        typer.Option(
            "--input",
            help="photos (scikit-image's sample photos) | synthetic | image/.npy file | folder",
        ),
    ] = "photos",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of tables.")] = False,
    upload_weights: Annotated[
        str,
        typer.Option(
            help="Weights the device uploads: auto (the smallest form the package build "
            "verified, >= 99 % top-1 agreement) | float32 | float16 | int8."
        ),
    ] = "auto",
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Run on a secured mosquitto instead (TLS, a certificate per agent, the ACL of "
            "`iotoffload security init`); needs mosquitto.",
        ),
    ] = False,
) -> None:
    """All in one on loopback: a broker, an edge agent, and a device agent that finds the
    edge by zeroconf (127.0.0.1), uploads the model while offloading queries, then prints a
    summary. The broker is the embedded one, or with --secure a secured mosquitto."""
    from broker.embedded import EmbeddedBroker
    from broker.secured import secured_mosquitto
    from device_agent.agent import DeviceAgent
    from device_agent.cli import summary_table
    from device_agent.config import DeviceConfig
    from device_agent.session import find_edge, iter_inputs, run_session
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeConfig
    from iotoffload.deploy.acl import Role
    from iotoffload.transport.security import MqttSecurity

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with rich_progress() as progress:
        if upload_weights not in UPLOAD_CHOICES:
            raise typer.BadParameter(
                f"one of {', '.join(UPLOAD_CHOICES)}", param_hint="--upload-weights"
            )
        pkg = ModelCache.from_settings().resolve(
            model, progress=progress, upload_weights=upload_weights
        )
    store = Path(tempfile.mkdtemp(prefix="iotoffload-demo-store-"))
    edge_id = f"demo-edge-{os.getpid()}"  # two demos on one network must not collide
    with contextlib.ExitStack() as stack:
        proto = 5 if secure else 311  # amqtt speaks MQTT 3.1.1
        if secure:
            agents = {edge_id: Role.EDGE, "demo-device": Role.DEVICE}
            sb = stack.enter_context(secured_mosquitto(agents))
            url0, edge_sec, dev_sec = sb.url, sb.security(edge_id), sb.security("demo-device")
            err_console.print(f"secured mosquitto at {url0} (TLS, client certificates, ACL)")
        else:
            url0 = stack.enter_context(EmbeddedBroker("127.0.0.1")).url
            edge_sec = dev_sec = MqttSecurity()
        edge = EdgeAgent(
            EdgeConfig(id=edge_id, broker=url0, store=store, interface="127.0.0.1", protocol=proto),
            edge_sec,
        )
        edge.start()
        try:
            cfg = DeviceConfig(interface="127.0.0.1", split=split, protocol=proto, edge=edge_id)
            url, edge_id = find_edge(cfg, dev_sec)
            err_console.print(f"discovered edge {edge_id} at {url} over zeroconf on 127.0.0.1")
            dev = DeviceAgent(
                pkg,
                url,
                edge_id,
                device_id="demo-device",
                protocol=proto,
                split=None if split == "auto" else int(split),
                security=dev_sec,
            )
            dev.connect()

            def on_query(rec: dict[str, object]) -> None:
                if as_json:
                    print(json.dumps(rec), flush=True)
                else:
                    where = "edge " if rec["offloaded"] else "local"
                    console.print(
                        f"#{rec['query']:<3} {rec['input']!s:<14} → {rec['top1']!s:<18} "
                        f"{rec['latency_ms']:>7.2f} ms {where} split {rec['split']:<2} "
                        f"({rec['reason']})"
                    )

            s = run_session(
                dev,
                iter_inputs(input, pkg, count),
                interval=interval,
                on_query=on_query,
                finish_upload=120.0,
            )
            dev.close()
        finally:
            edge.stop()
            shutil.rmtree(store, ignore_errors=True)
    if as_json:
        print(json.dumps(s.as_dict()))
    else:
        console.print(
            summary_table(
                s,
                f"demo: {pkg.name}, {pkg.num_blocks} blocks, split {dev.split}, "
                + ("secured mosquitto (TLS, ACL)" if secure else "embedded broker"),
            )
        )
        if pkg.manifest.weights == "seeded":
            console.print("[yellow]seeded random weights: labels are meaningless[/]")
