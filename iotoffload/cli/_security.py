"""The broker-security options every command that connects to a broker takes, and how they
combine with a config file's ``[mqtt]`` table and ``IOTOFFLOAD_MQTT_*`` (flags win, then the
file, then the environment). There is no password flag: a command line is visible to every
user of the machine (``ps``); the password comes from ``--password-file`` or
``IOTOFFLOAD_MQTT_PASSWORD``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from iotoffload.transport.security import MqttSecurity

_PANEL = "Broker security (mqtts://)"

CaFile = Annotated[
    Path | None,
    typer.Option(
        help="CA certificates (PEM) that verify the broker; default: the system's.",
        rich_help_panel=_PANEL,
    ),
]
CertFile = Annotated[
    Path | None,
    typer.Option(help="This client's certificate (PEM), for mutual TLS.", rich_help_panel=_PANEL),
]
KeyFile = Annotated[
    Path | None,
    typer.Option(help="The certificate's private key (PEM).", rich_help_panel=_PANEL),
]
Username = Annotated[str | None, typer.Option(help="Broker username.", rich_help_panel=_PANEL)]
PasswordFile = Annotated[
    Path | None,
    typer.Option(
        help="File whose first line is the password (or set IOTOFFLOAD_MQTT_PASSWORD).",
        rich_help_panel=_PANEL,
    ),
]
TlsInsecure = Annotated[
    bool,
    typer.Option(
        "--tls-insecure",
        help="Do not check the broker's hostname against its certificate (labs only).",
        rich_help_panel=_PANEL,
    ),
]


def load_security(
    config: Path | None,
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    username: str | None,
    password_file: Path | None,
    tls_insecure: bool,
) -> MqttSecurity:
    """The settings from the flags, ``config``'s ``[mqtt]`` table and the environment; a
    ValueError that names what is wrong (the CLI prints it in one line)."""
    table: dict[str, object] = {}
    if config is not None:
        try:
            with Path(config).open("rb") as f:
                table = dict(tomllib.load(f).get("mqtt", {}))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{config}: {e}") from e
    try:
        return MqttSecurity.load(
            table,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            username=username,
            password_file=password_file,
            tls_insecure=True if tls_insecure else None,
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "mqtt"
        raise ValueError(f"broker security settings: {where}: {first['msg']}") from None
