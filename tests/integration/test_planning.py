"""The planner in the loop: a loaded edge pushes the split toward the device (LoADPart)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from broker.embedded import EmbeddedBroker
from device_agent.agent import DeviceAgent
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model import ModelPackage
from iotoffload.planning import Estimates
from iotoffload.runtime import TFLiteExecutor
from iotoffload.runtime.profiling import measure_device_ms
from iotoffload.transport.frame import Query, encode_tensor_frame

pytestmark = pytest.mark.integration


def test_high_edge_load_moves_the_split_toward_the_device(
    mobilenet: ModelPackage, tmp_path: Path
) -> None:
    # A slow device: its measured TFLite block times x20, a small board against a server
    # core. x4 was not enough on a quiet machine: TFLite with XNNPACK measured 5.6 ms for the
    # whole model while the edge's ONNX Runtime profile summed 25 ms and the link estimate
    # added ~26 ms, so the idle plan was local. At x20 (~110 ms local against ~50 ms
    # offloaded) the idle plan offloads with a 2x margin, and the burst below still queues
    # over ten times the device's whole local time at the edge.
    slow = [20 * v for v in measure_device_ms(mobilenet, TFLiteExecutor.from_package(mobilenet))]
    x = np.zeros((1, 224, 224, 3), np.float32)
    with EmbeddedBroker() as b:
        edge = EdgeAgent(
            EdgeConfig(
                id="busy",
                broker=b.url,
                store=tmp_path / "s",
                advertise=False,
                protocol=311,
                workers=1,
            )
        )
        edge.start()
        dev = DeviceAgent(
            mobilenet,
            b.url,
            "busy",
            protocol=311,
            planner="loadpart",
            device_ms=slow,
            deadline_ms=10_000,
            estimates=Estimates(bandwidth_Bps=200e6, rtt_ms=1.0),
        )
        noisy = DeviceAgent(mobilenet, b.url, "busy", protocol=311, split=0)
        try:
            assert dev.connect() is not None and noisy.connect() is not None
            dev.upload()
            idle = [dev.query(x, i) for i in range(3)]
            assert all(o.offloaded for o in idle), [o.reason for o in idle]
            split_idle = idle[-1].split
            assert split_idle < mobilenet.num_blocks
            # load: 60 whole-model queries queued at the edge (one worker) at once
            for i in range(60):
                noisy.link.publish(
                    edge.topics.edge_query("busy", noisy.device_id),
                    encode_tensor_frame(
                        Query,
                        x,
                        request_id=f"load-{i}",
                        device=noisy.device_id,
                        model_id=mobilenet.manifest.model_id,
                        start=0,
                        end=18,
                        deadline_ms=60_000,
                    ),
                )
            end = time.monotonic() + 10
            while edge.load_factor() < 20 and time.monotonic() < end:  # the burst has arrived
                time.sleep(0.005)
            loaded = dev.query(x, 3)  # waits behind the burst: the reply reports the queue
            assert loaded.offloaded and (loaded.edge_queue_ms or 0) > 100
            assert dev.inputs.estimates.queue_ms > 15
            after = dev.query(x, 4)
            assert after.split > split_idle, (after.plan, dev.inputs.estimates)
        finally:
            dev.close()
            noisy.close()
            edge.stop()
