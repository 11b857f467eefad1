"""Faults with real processes: an edge killed mid-stream, a broker restarted mid-upload."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model import ModelPackage
from tests.integration.conftest import Mosquitto

pytestmark = pytest.mark.integration


def test_edge_killed_mid_stream_every_query_is_answered_locally(
    mobilenet: ModelPackage, tmp_path: Path
) -> None:
    with Mosquitto(tmp_path) as m:
        url = m.url
        edge = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "start",
                "--broker",
                url,
                "--id",
                "victim",
                "--store",
                str(tmp_path / "store"),
                "--no-advertise",
                "--protocol",
                "5",
            ],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            dev = DeviceAgent(mobilenet, url, "victim", split=12, deadline_ms=500)
            deadline = time.monotonic() + 20
            while dev.connect(timeout=2) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            dev.upload()
            x = np.zeros((1, 224, 224, 3), np.float32)
            outs = [dev.query(x, i) for i in range(3)]
            assert all(o.offloaded for o in outs)
            edge.kill()  # SIGKILL: no goodbye, the broker's Last Will says offline later
            edge.wait(5)
            after = [dev.query(x, 3 + i) for i in range(5)]
            assert all(not o.offloaded for o in after)
            assert all(o.output.shape == (1, 1000) for o in after)
            assert {o.reason for o in after} <= {
                "deadline passed",
                "edge offline",
                "edge went offline",
            }
            np.testing.assert_allclose(after[0].output, outs[0].output, rtol=0, atol=1e-5)
            dev.close()
        finally:
            if edge.poll() is None:
                edge.kill()
                edge.wait(5)


def test_broker_restart_during_upload_resumes_without_resending_stored_blocks(
    mobilenet: ModelPackage, tmp_path: Path
) -> None:
    with Mosquitto(tmp_path) as m:
        url = m.url
        edge = EdgeAgent(EdgeConfig(id="e1", broker=url, store=tmp_path / "store", advertise=False))
        edge.start()
        dev = DeviceAgent(mobilenet, url, "e1", split=0, chunk_size=64 * 1024)
        try:
            assert dev.connect() is not None
            # paced: unpaced on loopback the window (a round trip at the measured bandwidth) holds
            # a whole block, sent before the restart could land inside it
            dev.upload_rate_Bps = 4e6
            dev.start_upload()
            # the restart lands inside the last (biggest) block: some of its chunks sent, most not
            # (waiting for 16 blocks stored raced the edge finishing 16 and 17 in between)
            last = mobilenet.num_blocks - 1
            deadline = time.monotonic() + 60

            def sent() -> tuple[int, int]:  # read on the device's loop, which owns the counters
                s = dev.session
                return dev.loop.call(
                    lambda: (s.chunks_sent.get(last, 0), s.chunk_counts.get(last, 0))
                )

            # (chunks are sized to the link, at most 64 KiB here: the count is the session's)
            while not 0 < (n := sent())[0] < n[1] // 2:
                assert time.monotonic() < deadline, "the upload never reached the last block"
                time.sleep(0.002)
            stored_before = set(dev.inventory.stored)
            m.restart()
            lost_at_most = sent()[0]  # sent before the broker came back: some may be lost
            assert dev.wait_upload(90), "upload did not finish after the broker came back"
            assert not dev.upload_errors
            assert dev.resumed_blocks, "the restart did not interrupt the upload"
            assert dev.inventory.stored == list(range(18))
            counts = dev.loop.call(lambda: dict(dev.session.chunk_counts))
            for b in stored_before:  # blocks stored before the restart were sent exactly once
                assert dev.chunks_sent[b] == counts[b]
            # the interrupted block: what was lost resent once, not the whole block twice (the
            # pass from before the restart went on after it, beside the resume: 2x the chunks,
            # queued ahead of the first query at the edge)
            assert dev.chunks_sent[last] <= counts[last] + lost_at_most
            out = dev.query(np.zeros((1, 224, 224, 3), np.float32))
            assert out.offloaded, out.reason
        finally:
            dev.close()
            edge.stop()
