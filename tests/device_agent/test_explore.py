"""Exploration: a device that went local sends one offloading query now and then, when that is
predicted close to local, so its estimates cannot stay stale forever."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from device_agent.agent import DeviceAgent
from iotoffload.model import ModelPackage
from iotoffload.planning import Estimates
from iotoffload.transport.frame import Inventory
from tests.device_agent.helpers import inject

Make = Callable[..., DeviceAgent]


@pytest.fixture
def make(mobilenet: ModelPackage) -> Iterator[Make]:
    made: list[DeviceAgent] = []

    def _agent(bandwidth_Bps: float, **kw: object) -> DeviceAgent:  # noqa: N803
        n = mobilenet.num_blocks
        dev = DeviceAgent(
            mobilenet,
            "mqtt://127.0.0.1:9",
            "e1",
            device_ms=[1.0] * n,
            estimates=Estimates(bandwidth_Bps=bandwidth_Bps, rtt_ms=1.0),
            **kw,  # type: ignore[arg-type]
        )
        made.append(dev)
        model = mobilenet.manifest.model_id
        inject(dev, Inventory(model_id=model, known=True, stored=list(range(n)), edge="e1"))
        return dev

    yield _agent
    for dev in made:
        dev.close()


def _explore(dev: DeviceAgent) -> object:
    return dev.loop.call(lambda: dev.queries.exploration(dev.session, dev.current_plan()))


def _stale(dev: DeviceAgent) -> None:
    dev.queries.last_reply = time.monotonic() - 10


def test_explores_a_close_offloading_plan_once_per_period(make: Make) -> None:
    dev = make(1e9)  # offloading costs about the round trip more than local
    local = dev.current_plan()
    assert not local.offloads  # the same speed on both sides: local is best
    _stale(dev)
    plan = dev.loop.call(lambda: dev.queries.exploration(dev.session, local))
    assert plan is not None and plan.offloads
    assert plan.latency_ms <= local.latency_ms * 1.25
    assert _explore(dev) is None  # not again within the period


def test_no_exploration_when_far_worse_recent_or_local_planner(make: Make) -> None:
    slow = make(1e3)  # 1 KB/s: any boundary costs seconds
    _stale(slow)
    assert _explore(slow) is None
    fresh = make(1e9)  # a reply came just now
    assert _explore(fresh) is None
    local = make(1e9, planner="local")
    _stale(local)
    assert _explore(local) is None
    never = make(1e9, explore_s=None)
    _stale(never)
    assert _explore(never) is None
