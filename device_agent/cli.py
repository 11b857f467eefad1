"""``device-agent``: offload a model's queries to a nearby edge.

Until the MQTT transport lands the agent can only print its help; ``iotoffload model run``
runs the same mixed TFLite/ONNX chain locally.
"""

from __future__ import annotations

import typer

from iotoffload.cli._console import fail

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def run(
    model: str = typer.Option("mobilenet", help="Model package name or directory."),
) -> None:
    """Offload queries of MODEL to an edge (not available yet: needs the MQTT transport)."""
    fail(
        "offloading over MQTT is not implemented in this version; run the mixed chain "
        f"locally with: iotoffload model run {model}"
    )


def main() -> None:
    app()
