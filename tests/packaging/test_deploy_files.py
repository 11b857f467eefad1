"""The shipped deployment files (packaging/): systemd units and the compose file name real
commands with options those commands take, and the image copies what exists. (Running them
needs systemd or Docker images, which the test machines lack; the secured setup they use is
tested in tests/integration/test_cli_security.py.)"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from device_agent.cli import app as device_app
from edge_agent.cli import app as edge_app

ROOT = Path(__file__).parents[2]
PACKAGING = ROOT / "packaging"


def _options(command: Any) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def _command(argv: list[str]) -> tuple[Any, list[str]]:
    """The (click) command an argv names (``edge-agent start``, ``device-agent``), and the
    rest of it."""
    exe = Path(argv[0]).name
    if exe == "edge-agent":
        sub = typer.main.get_command(edge_app).commands.get(argv[1])  # type: ignore[attr-defined]
        assert sub is not None, argv
        return sub, argv[2:]
    assert exe == "device-agent", f"{exe}: not one of the project's commands"
    return typer.main.get_command(device_app), argv[1:]


def _check_argv(argv: list[str]) -> None:
    command, rest = _command(argv)
    known = _options(command)
    used = [a for a in rest if a.startswith("--")]
    assert used, argv
    unknown = [a for a in used if a not in known]
    assert not unknown, f"{argv[0]}: no such options {unknown}"


@pytest.mark.parametrize("unit", sorted((PACKAGING / "systemd").glob("*.service")), ids=str)
def test_systemd_units_run_real_commands(unit: Path) -> None:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(unit)
    assert {"Unit", "Service", "Install"} <= set(cp.sections())
    svc = cp["Service"]
    argv = shlex.split(svc["ExecStart"].replace("%i", "cam1"))
    assert argv[0].startswith("/opt/iotoffload/bin/")
    _check_argv(argv)
    # a broker not up yet at boot exits with code 2 too: always restarted
    assert svc["Restart"] == "always" and "RestartPreventExitStatus" not in svc
    assert svc["User"] == "iotoffload" and svc["ReadWritePaths"] == "/var/lib/iotoffload"


def test_compose_runs_the_edge_beside_the_secured_mosquitto() -> None:
    doc = yaml.safe_load((PACKAGING / "compose" / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"mosquitto", "edge"}
    mq = services["mosquitto"]
    assert mq["command"][-1].endswith("/mosquitto.conf")  # what security init writes
    edge = services["edge"]
    argv = [re.sub(r"\$\{[^}]*\}", "x", a) for a in edge["command"]]
    _check_argv(argv)
    broker = edge["command"][edge["command"].index("--broker") + 1]
    # TLS, and the address devices reach (the edge advertises it), never loopback
    assert broker.startswith("mqtts://${EDGE_ADDRESS") and "127.0.0.1" not in broker
    # both mount the lab at the path its files name each other by
    lab = "${IOTOFFLOAD_LAB}:${IOTOFFLOAD_LAB}:ro"
    assert lab in mq["volumes"] and lab in edge["volumes"]
    dockerfile = ROOT / edge["build"]["context"].replace("../..", ".") / edge["build"]["dockerfile"]
    assert dockerfile.exists()
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, not in the tree"
