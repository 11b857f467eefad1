"""``iotoffload security``: a secured broker setup in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iotoffload.cli._console import console, user_errors

app = typer.Typer(
    help="Secured deployments: a lab CA, certificates or passwords per agent, broker ACLs.",
    no_args_is_help=True,
)


def _ids(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


Ids = typer.Option(help="Comma-separated ids.", show_default=False)


@app.command("init")
@user_errors
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write the setup (created).")],
    edges: Annotated[str | None, Ids] = None,
    devices: Annotated[str | None, Ids] = None,
    apps: Annotated[str | None, Ids] = None,
    operators: Annotated[str | None, Ids] = None,
    auth: Annotated[
        str | None,
        typer.Option(
            help="cert: a client certificate per agent (its CN is the identity); "
            "password: a username and a random password per agent. Default: cert, or what "
            "DIRECTORY already uses.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Address the broker listens on. Default: 127.0.0.1, or DIRECTORY's.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="TLS port of the broker. Default: 8883, or DIRECTORY's.", show_default=False
        ),
    ] = None,
    name: Annotated[
        list[str] | None,
        typer.Option(help="Extra DNS name or IP of the broker's certificate (repeatable)."),
    ] = None,
    prefix: Annotated[str | None, typer.Option(help="Topic prefix.")] = None,
) -> None:
    """Write a lab CA, the broker's certificate, one certificate (or password) per agent, the
    ACL by role and a mosquitto configuration to DIRECTORY, plus one config file per agent
    for --config. Run it again with more ids to add agents: what exists is kept."""
    from iotoffload.deploy.lab import LabPlan, agents_by_role, init_lab

    agents = agents_by_role(
        edges=_ids(edges), devices=_ids(devices), apps=_ids(apps), operators=_ids(operators)
    )
    names = list(
        dict.fromkeys(["127.0.0.1", "localhost", *([host] if host else []), *(name or [])])
    )
    plan = LabPlan(
        directory,
        agents,
        auth=auth,
        host=host,
        port=port,
        server_names=names,
        prefix=prefix,
    )
    r = init_lab(plan)
    new = ", ".join(r.created) if r.created else "none (all kept)"
    console.print(f"secured setup in {directory}: new credentials for {new}")
    console.print(f"  broker:   mosquitto -c {r.conf}")
    console.print(f"     or:   iotoffload broker --secured {directory} (embedded, MQTT 3.1.1)")
    for who, cfg in sorted(r.agent_configs.items()):
        role = r.roles[who].value
        if role == "edge":
            cmd = f"edge-agent start --config {cfg}"
        elif role == "device":
            cmd = f"device-agent --config {cfg} --model mobilenet"
        else:
            cmd = f"(its [mqtt] settings: {cfg})"
        console.print(f"  {role:<9} {who}: {cmd}", markup=False, highlight=False)
    console.print(f"  ACL (the security boundary): {r.acl}")
