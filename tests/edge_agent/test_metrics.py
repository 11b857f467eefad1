"""The edge's Prometheus endpoint, scraped over real HTTP from an edge on a real mosquitto,
and the devices-seen window it reports on hand-checked cases."""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.metrics import (
    SNAPSHOT_TTL_S,
    DevicesSeen,
    EdgeSnapshot,
    MetricsBindError,
    _SnapshotCollector,
)
from edge_agent.stats import EdgeStats
from iotoffload.transport.frame import ErrorCode
from iotoffload.transport.status import EdgeStatus
from tests.edge_agent.conftest import Harness, tiny_model, wait_until

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def test_devices_seen_counts_a_window_and_stays_bounded() -> None:
    seen = DevicesSeen(window_s=60, limit=3)
    seen.saw("a", now=0)
    seen.saw("b", now=10)
    seen.saw("a", now=20)  # heard again: the newest now
    assert seen.active(now=75) == 1  # b (10) out of the 60 s window, a (20) in
    assert seen.active(now=81) == 0
    for k, d in enumerate(["c", "d", "e", "f"]):
        seen.saw(d, now=100 + k)
    assert seen.active(now=110) == 3  # a stranger inventing ids pins at most ``limit``


def _scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.mark.integration
def test_metrics_count_what_the_edge_did(harness: Harness) -> None:
    model = tiny_model()
    edge = harness.edge(metrics_port=0)
    port = edge.metrics_port
    assert port is not None
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    n = 7
    for j in range(n):
        dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(model, f"q{j}", X))
        dev.result(f"q{j}")
    # a query for a model nobody announced: refused, counted by its code
    other = tiny_model(2)
    dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(other, "bad", X))
    dev.error(lambda e: e.request_id == "bad")
    wait_until(lambda: _scrape(port)["iotoffload_edge_queries_total"][()] == n, 5, "n counted")
    m = _scrape(port)
    assert m["iotoffload_edge_queue_seconds_count"][()] == n
    assert m["iotoffload_edge_exec_seconds_count"][()] == n
    assert 0 < m["iotoffload_edge_exec_seconds_sum"][()] < n * 10
    # one query at a time, each answered alone: n observations of a batch of 1
    assert m["iotoffload_edge_batch_size_count"][()] == n
    assert m["iotoffload_edge_batch_size_sum"][()] == n
    errors = {dict(k)["code"]: v for k, v in m["iotoffload_edge_errors_total"].items()}
    assert errors == {ErrorCode.UNKNOWN_MODEL.value: 1}
    assert m["iotoffload_edge_blocks"][()] == 3 and m["iotoffload_edge_models"][()] == 1
    assert m["iotoffload_edge_blocks_uploaded_total"][()] == 3
    assert m["iotoffload_edge_store_bytes"][()] == sum(len(b) for b in model.blocks)
    assert m["iotoffload_edge_devices_connected"][()] == 1
    assert m["iotoffload_edge_quarantined_blocks"][()] == 0
    (info,) = m["iotoffload_edge_info"]
    assert dict(info)["edge"] == "edge1" and dict(info)["providers"] == "CPUExecutionProvider"
    assert dict(info)["providers_in_use"] == "CPUExecutionProvider"  # the workers' sessions
    # the Grafana dashboard queries only what the edge exposes
    dashboard = (Path(__file__).parents[2] / "docs" / "grafana-edge-dashboard.json").read_text()
    queried = set(re.findall(r"iotoffload_edge_[a-z_]+", dashboard))
    assert queried and queried <= set(m), queried - set(m)
    edge.stop()
    with pytest.raises(urllib.error.URLError):  # the endpoint goes with the edge
        _scrape(port)


@pytest.mark.integration
def test_metrics_are_off_unless_asked_for(harness: Harness) -> None:
    edge = harness.edge()
    assert edge.metrics_port is None and edge.metrics._server is None


def test_scrapes_close_together_share_one_snapshot() -> None:
    taken: list[float] = []

    def snapshot() -> EdgeSnapshot:
        taken.append(time.monotonic())
        return EdgeSnapshot(EdgeStatus(state="online", edge="e1"), EdgeStats(queries=len(taken)))

    c = _SnapshotCollector(snapshot)
    for _ in range(50):  # a scrape flood
        names = {m.name for m in c.collect()}
    assert len(taken) == 1 and "iotoffload_edge_queries" in names
    time.sleep(SNAPSHOT_TTL_S)
    list(c.collect())
    assert len(taken) == 2


@pytest.mark.integration
def test_a_metrics_port_in_use_is_a_setup_error(harness: Harness) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsBindError, match=f"127.0.0.1:{port}"):
            harness.edge(metrics_port=port)
