"""The user-facing commands as a user runs them: real processes, real zeroconf on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from broker.embedded import free_port
from iotoffload.model import ModelPackage
from iotoffload.transport.mqtt import BrokerUnavailableError, Message, MqttLink
from iotoffload.transport.status import EdgeStatus
from iotoffload.transport.topics import Topics

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _env(pkg: ModelPackage) -> dict[str, str]:
    return dict(os.environ, IOTOFFLOAD_CACHE_DIR=str(pkg.root.parent))


def _wait_online(port: int, edge: str, timeout: float = 30.0) -> None:
    """Until ``edge`` publishes its retained online status on its broker at ``port`` (a fixed
    sleep raced the edge's start on a loaded machine)."""
    online = threading.Event()

    def on_status(m: Message) -> None:
        st = EdgeStatus.parse(m.payload)
        if st is not None and st.edge == edge and st.state == "online":
            online.set()

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        link = MqttLink(f"mqtt://127.0.0.1:{port}", f"wait-{edge}", protocol=311)
        link.subscribe(Topics().edge_status(edge), on_status)
        try:
            link.connect(2.0)
        except BrokerUnavailableError:
            time.sleep(0.1)  # the edge's embedded broker is not listening yet
            continue
        try:
            if online.wait(max(0.1, min(2.0, end - time.monotonic()))):
                return
        finally:
            link.close()
    raise AssertionError(f"edge {edge} did not come online on port {port} within {timeout:g} s")


def test_edge_agent_and_device_agent_found_by_zeroconf(
    mobilenet: ModelPackage, tmp_path: Path
) -> None:
    env = _env(mobilenet)
    port = free_port()
    edge = subprocess.Popen(
        [
            BIN / "edge-agent",
            "start",
            "--port",
            str(port),
            "--id",
            "cli-edge",
            "--store",
            str(tmp_path / "store"),
            "--interface",
            os.environ["IOTOFFLOAD_INTERFACE"],
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_online(port, "cli-edge")
        r = subprocess.run(
            [
                BIN / "device-agent",
                "--edge",
                "cli-edge",
                "--count",
                "4",
                "--json",
                "--wait-upload",
                "--split",
                "10",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        queries, summary = lines[:-1], lines[-1]
        assert len(queries) == 4 and summary["summary"] and summary["queries"] == 4
        for q in queries:
            assert {"query", "top1", "latency_ms", "split", "offloaded", "edge"} <= q.keys()
            assert q["split"] == 10 and q["edge"] == "cli-edge"
        assert all(q["offloaded"] for q in queries)  # the upload finished first
        assert summary["bytes_uploaded"] == sum(b.upload_bytes for b in mobilenet.blocks)
    finally:
        edge.send_signal(signal.SIGTERM)
        out, _ = edge.communicate(timeout=20)
    assert edge.returncode == 0, out
    assert "shutting down" in out and "served 4 queries" in out


def test_edge_agent_refuses_a_provider_its_onnx_runtime_lacks(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA: the refusal cannot be shown with it")
    r = subprocess.run(
        [
            BIN / "edge-agent",
            "start",
            *("--broker", "mqtt://127.0.0.1:9", "--store", str(tmp_path)),
            *("--provider", "CUDAExecutionProvider", "--provider", "CPUExecutionProvider"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert "CUDAExecutionProvider" in err and "not available" in err
    assert "CPUExecutionProvider" in err  # what it has, named
    assert "Traceback" not in r.stderr


def test_device_agent_without_an_edge_says_so(mobilenet: ModelPackage) -> None:
    env = dict(_env(mobilenet), IOTOFFLOAD_DEVICE_DISCOVERY_TIMEOUT="0.5")
    r = subprocess.run(
        [BIN / "device-agent", "--edge", "nobody-here", "--count", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "no edge found" in r.stderr


def test_demo_runs_end_to_end(mobilenet: ModelPackage) -> None:
    cmd = [
        BIN / "iotoffload",
        "demo",
        "--model",
        "mobilenet",
        "--input",
        "synthetic",
        "--count",
        "6",
        "--json",
        "--interval",
        "0",
    ]
    r = subprocess.run(cmd, env=_env(mobilenet), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    summary = lines[-1]
    assert summary["queries"] == 6 and summary["offloaded"] + summary["local"] == 6
    assert summary["bytes_uploaded"] > 0
    assert "discovered edge demo-edge" in r.stderr


def test_device_agent_prefer_moves_to_an_edge_found_by_zeroconf_on_another_broker(
    mobilenet: ModelPackage, tmp_path: Path
) -> None:
    env = _env(mobilenet)
    iface = os.environ["IOTOFFLOAD_INTERFACE"]
    pa, pb = free_port(), free_port()
    edges = []
    for eid, port, extra in (
        ("cli-a", pa, []),
        ("cli-b", pb, ["--peer-broker", f"mqtt://127.0.0.1:{pa}"]),
    ):
        edges.append(
            subprocess.Popen(
                [
                    BIN / "edge-agent",
                    "start",
                    "--port",
                    str(port),
                    "--id",
                    eid,
                    "--store",
                    str(tmp_path / eid),
                    "--interface",
                    iface,
                    *extra,
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        _wait_online(pa, "cli-a")
        _wait_online(pb, "cli-b")
        r = subprocess.run(
            [
                BIN / "device-agent",
                "--broker",
                f"mqtt://127.0.0.1:{pa}",
                "--edge",
                "cli-a",
                "--prefer",
                "cli-b",
                "--split",
                "10",
                "--count",
                "80",
                "--interval",
                "0.1",
                "--json",
                "--interface",
                iface,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        queries, summary = lines[:-1], lines[-1]
        assert [q["query"] for q in queries] == list(range(80))  # each answered, once
        moves = summary["handoffs"]
        assert [(h["from"], h["to"], h["reason"]) for h in moves] == [
            ("cli-a", "cli-b", "preferred")
        ]
        assert queries[-1]["session_edge"] == "cli-b"
        assert queries[-1]["offloaded"] and queries[-1]["edge"] == "cli-b"
        assert {q["edge"] for q in queries} <= {"cli-a", "cli-b", None}
    finally:
        for e in edges:
            e.send_signal(signal.SIGTERM)
        for e in edges:
            e.communicate(timeout=20)
