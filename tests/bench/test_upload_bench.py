"""Smoke runs of the upload scenario (seconds, so the bench code cannot rot) and the testbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iotoffload.bench.netns import Testbed, TestbedUnavailableError, check_testbed
from iotoffload.bench.upload import run_once
from iotoffload.cli import app
from iotoffload.model import ModelPackage

pytestmark = pytest.mark.integration


def test_loopback_smoke_writes_table_json_and_plot(
    mobilenet: ModelPackage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOTOFFLOAD_CACHE_DIR", str(mobilenet.root.parent))
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "upload",
            "--loopback",
            "--bandwidths",
            "100",
            "--planners",
            "local,auto",
            "--duration",
            "8",
            "--after-upload",
            "1",
            "--interval",
            "0.1",
            "--out",
            str(tmp_path),
            "--rtt-ms",
            "10",  # through the delay proxy
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "upload.json").read_text())
    assert result["network"] == "loopback" and result["rtt_ms"] == 10
    runs = {x["planner"]: x for x in result["runs"]}
    assert runs["auto"]["bytes_uploaded"] == sum(b.onnx_bytes for b in mobilenet.blocks)
    assert runs["auto"]["upload_s"] is not None and runs["auto"]["queries"] > 3
    assert runs["local"]["bytes_uploaded"] == 0 and runs["local"]["queries"] > 3
    assert (tmp_path / "upload.png").stat().st_size > 10_000
    assert "upload scenario" in r.output


needs_testbed = pytest.mark.skipif(check_testbed() is not None, reason=str(check_testbed()))


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@needs_testbed
def test_testbed_shapes_the_link_and_cleans_up() -> None:
    receiver = (
        "import socket,sys;s=socket.socket();s.bind(('10.201.0.1',9999));s.listen();"
        "c,_=s.accept();n=0\nwhile (d:=c.recv(65536)): n+=len(d)\nprint(n)"
    )
    with Testbed(rate_mbit=8, device_cpu_percent=50, tag=f"t1{os.getpid() % 1000}") as tb:
        assert tb.dev_ns in _namespaces() and tb.cgroup.exists()
        srv = subprocess.Popen(
            tb.edge_cmd(sys.executable, "-c", receiver), stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.5)
        t0 = time.perf_counter()
        subprocess.run(
            tb.device_cmd(
                sys.executable,
                "-c",
                "import socket;s=socket.create_connection(('10.201.0.1',9999));"
                "s.sendall(b'x'*1_000_000);s.close()",
            ),
            check=True,
        )
        got = int(srv.communicate(timeout=30)[0])
        mbit = got * 8 / (time.perf_counter() - t0) / 1e6
        assert got == 1_000_000
        assert mbit < 9.5  # shaped to 8 Mbit/s (loopback would be thousands)
    assert tb.dev_ns not in _namespaces() and not tb.cgroup.exists()


@needs_testbed
def test_testbed_is_removed_when_the_body_fails() -> None:
    tb = Testbed(rate_mbit=10, tag=f"t2{os.getpid() % 1000}")
    with pytest.raises(ZeroDivisionError), tb:
        _ = 1 / 0
    assert tb.dev_ns not in _namespaces() and tb.edge_ns not in _namespaces()


@needs_testbed
def test_upload_run_over_the_emulated_network(mobilenet: ModelPackage) -> None:
    with Testbed(rate_mbit=50, device_cpu_percent=50, tag=f"t3{os.getpid() % 1000}") as tb:
        run = run_once(
            mobilenet.root,
            "auto",
            50,
            testbed=tb,
            cpu_percent=50,
            duration=20,
            after_upload=1,
            interval=0.1,
            rtt_ms=20,
        )
    assert run.network == "netns" and run.upload_s is not None and run.rtt_ms == 20
    assert run.bytes_uploaded == sum(b.onnx_bytes for b in mobilenet.blocks)
    # 14 MB at 50 Mbit/s takes at least 2.2 s: the shaping applied to the upload
    assert run.upload_s > 2.0 and run.records


@pytest.mark.parametrize("network", ["loopback", pytest.param("netns", marks=needs_testbed)])
def test_upload_run_on_the_secured_broker(mobilenet: ModelPackage, network: str) -> None:
    """The secured setup written for the edge's address (its namespace's, or loopback): the
    device verifies the broker through the delay proxy (TLS passes through it), uploads the
    whole model as itself through the ACL and is answered."""
    kw = dict(cpu_percent=100, duration=20, after_upload=1, interval=0.1, rtt_ms=10, secured=True)
    if network == "netns":
        with Testbed(rate_mbit=200, device_cpu_percent=100, tag=f"t4{os.getpid() % 1000}") as tb:
            run = run_once(mobilenet.root, "edge", 200, testbed=tb, **kw)  # type: ignore[arg-type]
    else:
        run = run_once(mobilenet.root, "edge", 200, testbed=None, **kw)  # type: ignore[arg-type]
    assert run.network == network and run.upload_s is not None
    assert run.bytes_uploaded == sum(b.onnx_bytes for b in mobilenet.blocks)
    assert any(r["offloaded"] for r in run.records)


def test_unavailable_testbed_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import iotoffload.bench.netns as netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "root" in str(netns.check_testbed())
    with pytest.raises(TestbedUnavailableError, match="needs root"):
        Testbed(rate_mbit=1).__enter__()
