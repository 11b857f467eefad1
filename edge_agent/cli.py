"""``edge-agent``: serve offloaded DNN blocks to nearby devices.

Until the MQTT transport lands the agent can only print its help.
"""

from __future__ import annotations

import typer

from iotoffload.cli._console import fail

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)


@app.command()
def start() -> None:
    """Start the edge agent (not available yet: needs the MQTT transport)."""
    fail("the edge agent is not implemented in this version (it needs the MQTT transport)")


@app.callback()
def _root() -> None:
    """Keep ``start`` a sub-command even while it is the only one."""


def main() -> None:
    app()
