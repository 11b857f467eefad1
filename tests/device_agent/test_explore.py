"""Exploration: a device that went local sends one offloading query now and then, when that is
predicted close to local, so its estimates cannot stay stale forever."""

from __future__ import annotations

import time

from device_agent.agent import DeviceAgent
from iotoffload.model import ModelPackage
from iotoffload.planning import Estimates
from iotoffload.transport.frame import Inventory


def _agent(pkg: ModelPackage, bandwidth_Bps: float, **kw: object) -> DeviceAgent:  # noqa: N803
    n = pkg.num_blocks
    dev = DeviceAgent(
        pkg,
        "mqtt://127.0.0.1:9",
        "e1",
        device_ms=[1.0] * n,
        estimates=Estimates(bandwidth_Bps=bandwidth_Bps, rtt_ms=1.0),
        **kw,
    )  # type: ignore[arg-type]
    dev.session.on_inventory(
        Inventory(model_id=pkg.manifest.model_id, known=True, stored=list(range(n)), edge="e1")
    )
    return dev


def test_explores_a_close_offloading_plan_once_per_period(mobilenet: ModelPackage) -> None:
    dev = _agent(mobilenet, 1e9)  # offloading costs about the round trip more than local
    local = dev.current_plan()
    assert not local.offloads  # the same speed on both sides: local is best
    dev._last_reply = time.monotonic() - 10
    plan = dev._exploration(dev.session, local)
    assert plan is not None and plan.offloads
    assert plan.latency_ms <= local.latency_ms * 1.25
    assert dev._exploration(dev.session, local) is None  # not again within the period


def test_no_exploration_when_far_worse_recent_or_local_planner(mobilenet: ModelPackage) -> None:
    slow = _agent(mobilenet, 1e3)  # 1 KB/s: any boundary costs seconds
    slow._last_reply = time.monotonic() - 10
    assert slow._exploration(slow.session, slow.current_plan()) is None
    fresh = _agent(mobilenet, 1e9)  # a reply came just now
    assert fresh._exploration(fresh.session, fresh.current_plan()) is None
    local = _agent(mobilenet, 1e9, planner="local")
    local._last_reply = time.monotonic() - 10
    assert local._exploration(local.session, local.current_plan()) is None
    never = _agent(mobilenet, 1e9, explore_s=None)
    never._last_reply = time.monotonic() - 10
    assert never._exploration(never.session, never.current_plan()) is None
