"""A pixel query is planned with block 0's input at its uint8 bytes (hand-checked case)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from device_agent.queries import QueryRunner
from iotoffload.planning import Estimates, PlanningInputs, make_planner
from iotoffload.planning.model import ChainProfile


def test_pixels_make_offloading_from_block_0_pay_where_floats_do_not() -> None:
    # 2 blocks of 20 ms on the device, 1 ms on the edge; 1 MB float32 tensors into each,
    # 10 MB/s, no RTT: from block 0 float32 costs 100 + 2 ms (from block 1: 20 + 100 + 1)
    # against 40 locally, pixels 25 + 2 ms
    prof = ChainProfile((20.0, 20.0), (1.0, 1.0), (1_000_000, 1_000_000, 10), (100, 100))
    inputs = PlanningInputs(prof, Estimates(bandwidth_Bps=10e6, rtt_ms=0.0))
    px = np.zeros((1, 500, 500, 1), np.uint8)  # 250,000 bytes, a quarter of the input
    session = SimpleNamespace(inputs=inputs, pixels_refused=False)
    pixel = QueryRunner.pixel_inputs(session, px)  # type: ignore[arg-type]
    assert pixel.profile.boundary_bytes == (250_000, 1_000_000, 10)
    planner = make_planner("neurosurgeon")
    stored = frozenset({0, 1})
    assert planner.plan(inputs, stored).split == 2  # floats: all local
    plan = planner.plan(pixel, stored)
    assert plan.split == 0 and round(plan.latency_ms, 3) == 27.001  # 25 + 2 + 10 B back
    session.pixels_refused = True  # an edge that takes no pixels: floats' bytes again
    assert QueryRunner.pixel_inputs(session, px) is inputs  # type: ignore[arg-type]
