"""``iotoffload status`` against a real mosquitto with two real edges, one of them stopped."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from iotoffload.cli import app
from iotoffload.cli.status_cmd import table
from iotoffload.transport.status import EdgeLoad, EdgeStatus, StoreCounts
from tests.edge_agent.conftest import Harness, harness, mosquitto_url, tiny_model

__all__ = ["harness", "mosquitto_url"]  # the fixtures, used by name
runner = CliRunner()


def test_the_table_shows_what_a_status_says() -> None:
    st = EdgeStatus(
        state="online",
        edge="e1",
        version="9.9",
        models_total=2,
        blocks=5,
        store=StoreCounts(bytes=2_500_000, quarantined=1),
        load=EdgeLoad(queue=3, in_flight=1, queue_ms=4.25, exec_ms=12.5),
        devices=4,
        time=100.0,
    )
    console = Console(width=80, record=True)  # fits a plain terminal
    console.print(table([st], now=130.0))
    line = next(x for x in console.export_text().splitlines() if "e1" in x)
    cells = line.split()
    assert cells == [
        "e1",
        "online",
        "2",
        "5",
        "2.5",
        "MB",
        "3+1",
        "4.2/12.5",
        "4",
        "1",
        "CPU",
        "30",
        "s",
    ]


@pytest.mark.integration
def test_status_lists_online_and_offline_edges(harness: Harness) -> None:
    model = tiny_model()
    harness.edge("edge1")
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    gone = harness.edge("edge2")
    gone.stop()  # its retained status now says offline
    r = runner.invoke(app, ["status", "--broker", harness.url, "--json", "--models"])
    assert r.exit_code == 0, r.output
    docs = [json.loads(line) for line in r.output.splitlines()]  # one object per line
    by = {d["edge"]: d for d in docs}
    assert by["edge1"]["state"] == "online" and by["edge2"]["state"] == "offline"
    assert by["edge1"]["models"] == [model.model_id] and by["edge1"]["blocks"] == 3
    assert by["edge1"]["devices"] == 1 and by["edge1"]["providers"] == ["CPUExecutionProvider"]
    assert by["edge1"]["providers_in_use"] == ["CPUExecutionProvider"]  # blocks loaded
    r = runner.invoke(app, ["status", "--broker", harness.url])
    assert r.exit_code == 0 and "edge1" in r.output and "offline" in r.output


def test_status_without_a_broker_is_one_line_and_exit_code_2() -> None:
    r = runner.invoke(app, ["status", "--broker", "mqtt://127.0.0.1:9", "--wait", "0.1"])
    assert r.exit_code == 2
    assert "error" in r.output and "Traceback" not in r.output


def test_a_strangers_status_text_is_refused_or_shown_not_interpreted() -> None:
    # anyone may publish a retained status on an open broker: a provider that is no
    # provider's name makes the whole status not an edge's
    for bad in (["[/]", "[bold red]x"], ["a[/b", "]"], ["x" * 200 + "ExecutionProvider"]):
        doc = {"state": "online", "edge": "e2", "providers": bad}
        assert EdgeStatus.parse(json.dumps(doc)) is None, bad
        doc = {"state": "online", "edge": "e2", "providers_in_use": bad}
        assert EdgeStatus.parse(json.dumps(doc)) is None, bad
    # and the table parses none of a status's text as markup, even split across names
    # (escaping each name and joining them would let "a[/b" + "," + "]" close a tag)
    for names in (["[/]", "[bold red]x"], ["a[/b", "]"], ["x[link=https://e/", "]click"]):
        # (past validation, as a reader older than the bounds would hold it)
        st = EdgeStatus(state="online", edge="e2").model_copy(update={"providers": names})
        console = Console(width=100, record=True)
        console.print(table([st], now=0.0))
        assert ",".join(names) in console.export_text(clear=False), names
        assert "href" not in console.export_html()  # no link made of it


def test_a_configured_provider_the_sessions_do_not_run_on_is_struck_out() -> None:
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    fell_back = EdgeStatus(
        state="online", edge="e3", providers=gpu, providers_in_use=["CPUExecutionProvider"]
    )
    unloaded = EdgeStatus(state="online", edge="e4", providers=gpu)  # no block loaded yet
    console = Console(width=100, record=True)
    console.print(table([fell_back, unloaded], now=0.0))
    assert console.export_text(clear=False).count("CUDA,CPU") == 2
    styles = console.export_html(inline_styles=True)
    assert styles.count("line-through") == 1  # CUDA on e3 only
