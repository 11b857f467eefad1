"""Replaying an upload: the plan after each step and the mean latency during the upload."""

from __future__ import annotations

from dataclasses import dataclass

from iotoffload.planning.model import Plan, PlanningInputs
from iotoffload.planning.planners import Planner


@dataclass(frozen=True)
class UploadStep:
    block: int | None  # the block just uploaded (None: before the first)
    t_ms: float  # when this step begins, from the first contact
    plan: Plan


@dataclass(frozen=True)
class UploadReplay:
    planner: str
    order: list[int]
    steps: list[UploadStep]
    window_ms: float  # how long the upload takes
    mean_ms_during_upload: float  # time-weighted predicted query latency in that window
    first_offload_ms: float | None  # when the first plan that offloads becomes possible
    final: Plan


def replay(planner: Planner, p: PlanningInputs) -> UploadReplay:
    """Upload at the estimated bandwidth in the planner's order; queries arrive continuously."""
    order = planner.upload_order(p)
    avail: set[int] = set()
    t = 0.0
    steps = [UploadStep(None, 0.0, planner.plan(p, frozenset()))]
    for i in order:
        t += p.estimates.transfer_ms(p.profile.upload_bytes[i])
        avail.add(i)
        steps.append(UploadStep(i, t, planner.plan(p, frozenset(avail))))
    window = t
    if window > 0:
        weighted = sum(
            (steps[j + 1].t_ms - steps[j].t_ms) * steps[j].plan.latency_ms
            for j in range(len(steps) - 1)
        )
        mean = weighted / window
    else:
        mean = steps[-1].plan.latency_ms
    first = next((s.t_ms for s in steps if s.plan.offloads), None)
    return UploadReplay(planner.name, order, steps, window, mean, first, steps[-1].plan)
