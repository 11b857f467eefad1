"""The ``iotoffload`` command: model tools (and, as they land, broker, demo and bench)."""

from __future__ import annotations

import typer

from iotoffload import __version__
from iotoffload.cli.bench_cmd import app as bench_app
from iotoffload.cli.model_cmd import app as model_app
from iotoffload.cli.plan_cmd import plan
from iotoffload.cli.run_cmd import broker, demo
from iotoffload.cli.security_cmd import app as security_app
from iotoffload.cli.status_cmd import status

app = typer.Typer(
    help="iotoffload: run DNNs on IoT devices with the help of nearby edge servers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")
app.add_typer(security_app, name="security")
app.command()(broker)
app.command()(demo)
app.command()(plan)
app.command()(status)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    app()


__all__ = ["app", "main"]
