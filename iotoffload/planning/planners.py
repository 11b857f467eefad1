"""Planners: what to upload first, and how to run each query over the blocks the edge holds.

Every planner answers two questions through one interface:
``upload_order(inputs)`` — the order in which blocks go to the edge, and
``plan(inputs, available)`` — the plan for the next query, using only ``available`` blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from iotoffload.planning.cost import best_plan, best_weight, plan_steps, single_split_plan
from iotoffload.planning.model import Plan, PlanningInputs, Segment

IONN_K = 0.8  # IONN's penalty base: k = 1 - K^level


def _oblivious(p: PlanningInputs) -> PlanningInputs:
    return dataclasses.replace(p, load_aware=False)


def _local(p: PlanningInputs) -> Plan:
    return single_split_plan(p, p.profile.n)


def _rest(order: list[int], n: int) -> list[int]:
    seen = set(order)
    return order + [i for i in range(n) if i not in seen]


class Planner(Protocol):
    name: str

    def upload_order(self, p: PlanningInputs) -> list[int]: ...
    def plan(self, p: PlanningInputs, available: set[int] | frozenset[int]) -> Plan: ...


class LocalPlanner:
    name = "local"

    def upload_order(self, p: PlanningInputs) -> list[int]:
        return []

    def plan(self, p: PlanningInputs, available: set[int] | frozenset[int]) -> Plan:
        return _local(p)


class EdgePlanner:
    """The pre-installed-model assumption: everything on the edge once all of it is there."""

    name = "edge"

    def upload_order(self, p: PlanningInputs) -> list[int]:
        return list(range(p.profile.n))

    def plan(self, p: PlanningInputs, available: set[int] | frozenset[int]) -> Plan:
        if all(i in available for i in range(p.profile.n)):
            return single_split_plan(p, p.min_local)
        return _local(p)


class NeurosurgeonPlanner:
    """Best single split for the current bandwidth; load-oblivious."""

    name = "neurosurgeon"
    load_aware = False

    def _inputs(self, p: PlanningInputs) -> PlanningInputs:
        return p if self.load_aware else _oblivious(p)

    def upload_order(self, p: PlanningInputs) -> list[int]:
        k = best_plan(self._inputs(p), frozenset(range(p.profile.n)), single_split=True).split
        return _rest(list(range(k, p.profile.n)), p.profile.n)

    def plan(self, p: PlanningInputs, available: set[int] | frozenset[int]) -> Plan:
        return best_plan(self._inputs(p), available, single_split=True)


class LoadPartPlanner(NeurosurgeonPlanner):
    """LoADPart: the split search with the edge's load factor and queueing time."""

    name = "loadpart"
    load_aware = True


class IonnPlanner:
    """IONN: shortest paths with an upload penalty (1 - k) · upload time on not-yet-uploaded
    blocks, k = 1 - K^level; raising the level adds each new path's blocks to the upload
    order. Queries use the best path over uploaded blocks (device → edge → device allowed)."""

    name = "ionn"

    def upload_order(self, p: PlanningInputs) -> list[int]:
        return _rest(self.path_order(p), p.profile.n)

    def path_order(self, p: PlanningInputs) -> list[int]:
        """The blocks IONN's successive paths put on the edge, in the order they appear."""
        q = _oblivious(p)
        n = p.profile.n
        order: list[int] = []
        level = 0
        while True:
            k = 1 - IONN_K**level
            if k > 0.999:
                break
            penalty = {
                i: (1 - k) * q.estimates.transfer_ms(p.profile.upload_bytes[i])
                for i in range(n)
                if i not in order
            }
            path = best_plan(q, frozenset(range(n)), extra_edge_ms=penalty)
            order += [i for i in sorted(path.edge_blocks) if i not in order]
            level += 1
        return order

    def plan(self, p: PlanningInputs, available: set[int] | frozenset[int]) -> Plan:
        return best_plan(_oblivious(p), available)


class EfficiencyPlanner:
    """EMDL'19: upload the contiguous block range with the most query time saved per uploaded
    byte next (given what is already planned), while a range still saves time."""

    name = "efficiency"
    load_aware = False

    def _inputs(self, p: PlanningInputs) -> PlanningInputs:
        return p if self.load_aware else _oblivious(p)

    def upload_order(self, p: PlanningInputs) -> list[int]:
        q = self._inputs(p)
        n = p.profile.n
        planned: set[int] = set()
        order: list[int] = []
        # hundreds of walks over the same inputs (about n**3 / 6): their steps' weights once
        # (this ran at every upload's start: ~30 ms of a slowed device's CPU for ResNet-50)
        steps = plan_steps(q)
        current = best_weight(q, frozenset(planned), steps)
        while True:
            best: tuple[float, float, list[int]] | None = None
            for a in range(n):
                for b in range(a + 1, n + 1):
                    new = [i for i in range(a, b) if i not in planned]
                    if not new:
                        continue
                    w = best_weight(q, frozenset(planned | set(new)), steps)
                    gain = current - w
                    eff = gain / sum(p.profile.upload_bytes[i] for i in new)
                    if gain > 1e-9 and (best is None or eff > best[0]):
                        best = (eff, w, new)
            if best is None:
                break
            order += best[2]
            planned |= set(best[2])
            current = best[1]
        return _rest(order, n)

    def plan(self, p: PlanningInputs, available: set[int] | frozenset[int]) -> Plan:
        return best_plan(self._inputs(p), available)


class AutoPlanner(EfficiencyPlanner):
    """The default: efficiency-ordered upload, and per query the best load-aware plan for the
    chosen objective (device → edge → device allowed)."""

    name = "auto"
    load_aware = True


PLANNERS: dict[str, type[Planner]] = {
    c.name: c
    for c in (
        AutoPlanner,
        LocalPlanner,
        EdgePlanner,
        NeurosurgeonPlanner,
        IonnPlanner,
        EfficiencyPlanner,
        LoadPartPlanner,
    )
}


def make_planner(name: str) -> Planner:
    try:
        return PLANNERS[name]()
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; choose one of {', '.join(PLANNERS)}") from None


__all__ = ["PLANNERS", "Planner", "Segment", "make_planner"]
