"""Latency and energy of any plan, and the best plan over the blocks the edge holds.

A plan is a walk along the chain's boundaries, on the device or on the edge. Costs are additive
per step, so the best walk is a shortest path over 2 × (N + 1) states (device/edge at each
boundary): O(N), well under a millisecond for an 18-block chain.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from iotoffload.planning.model import Plan, PlanningInputs, Segment, Where

INF = float("inf")


def _edge_ms(p: PlanningInputs, i: int) -> float:
    f = p.estimates.load_factor if p.load_aware else 1.0
    return p.profile.edge_ms[i] * f


def _queue(p: PlanningInputs) -> float:
    return p.estimates.queue_ms if p.load_aware else 0.0


def evaluate(p: PlanningInputs, segments: Iterable[Segment]) -> tuple[float, float]:
    """(latency ms, device energy mJ) of a plan given as segments covering [0, N)."""
    pr, est, pw = p.profile, p.estimates, p.power
    scale = est.device_scale
    lat = energy = 0.0
    for s in segments:
        if s.where == "device":
            t = sum(pr.device_ms[s.start : s.end]) * scale
            lat += t
            energy += pw.compute_w * t
        else:
            t_in, t_out = (
                est.transfer_ms(pr.boundary_bytes[s.start]),
                est.transfer_ms(pr.boundary_bytes[s.end]),
            )
            wait = _queue(p) + sum(_edge_ms(p, i) for i in range(s.start, s.end))
            lat += t_in + wait + t_out
            energy += pw.transmit_w * t_in + pw.idle_w * (wait + t_out)
    return lat, energy


def _weight(p: PlanningInputs, ms: float, mj: float) -> float:
    if p.objective == "latency":
        return ms
    if p.objective == "energy":
        return mj
    return p.mix_weight * ms + (1 - p.mix_weight) * mj


@dataclass(frozen=True)
class Steps:
    """The weight of every step of the walk for one set of inputs, computed once: a planner
    that asks for many block sets (EMDL's upload order: hundreds) walks with these floats
    instead of recomputing transfers and weights per call. Index b: boundary or block b."""

    to_edge: tuple[float, ...]  # send the tensor at boundary b to the edge (INF: not allowed)
    to_device: tuple[float, ...]  # bring it back at boundary b
    device: tuple[float, ...]  # block b on the device
    edge: tuple[float, ...]  # block b on the edge, when it holds it (INF: not allowed)


def plan_steps(p: PlanningInputs, extra_edge_ms: dict[int, float] | None = None) -> Steps:
    """The steps' weights for ``p``; ``extra_edge_ms`` adds a per-block penalty (IONN's upload
    penalty) to running a block on the edge."""
    pr, est, pw = p.profile, p.estimates, p.power
    extra = extra_edge_ms or {}
    n, q = pr.n, _queue(p)
    to_edge, to_device = [INF] * (n + 1), [INF] * (n + 1)
    for b in range(max(p.min_local, 0), n + 1):
        t = est.transfer_ms(pr.boundary_bytes[b])
        to_edge[b] = _weight(p, t + q, pw.transmit_w * t + pw.idle_w * q)
        to_device[b] = _weight(p, t, pw.idle_w * t)
    device, edge = [], []
    scale = est.device_scale
    for b in range(n):
        d = pr.device_ms[b] * scale
        device.append(_weight(p, d, pw.compute_w * d))
        e = _edge_ms(p, b) + extra.get(b, 0.0)
        edge.append(_weight(p, e, pw.idle_w * e) if b >= p.min_local else INF)
    return Steps(tuple(to_edge), tuple(to_device), tuple(device), tuple(edge))


def _walk(
    s: Steps, available: set[int] | frozenset[int], back: list[list[tuple[int, int] | None]] | None
) -> float:
    """The shortest walk from (0, device) to (N, device) over edge blocks in ``available``:
    its weight, and its back-pointers written into ``back`` when given."""
    n = len(s.device)
    dev = [INF] * (n + 1)  # best weight reaching boundary b on the device
    edg = [INF] * (n + 1)  # ... on the edge
    dev[0] = 0.0
    for b in range(n + 1):
        for _ in range(2):  # a switch at b may enable the other state at the same b
            if dev[b] + s.to_edge[b] < edg[b]:
                edg[b] = dev[b] + s.to_edge[b]
                if back is not None:
                    back[b][1] = (b, 0)
            if edg[b] + s.to_device[b] < dev[b]:
                dev[b] = edg[b] + s.to_device[b]
                if back is not None:
                    back[b][0] = (b, 1)
        if b == n:
            break
        if dev[b] + s.device[b] < dev[b + 1]:
            dev[b + 1] = dev[b] + s.device[b]
            if back is not None:
                back[b + 1][0] = (b, 0)
        if b in available and edg[b] + s.edge[b] < edg[b + 1]:
            edg[b + 1] = edg[b] + s.edge[b]
            if back is not None:
                back[b + 1][1] = (b, 1)
    return dev[n]


def best_weight(p: PlanningInputs, available: set[int] | frozenset[int], steps: Steps) -> float:
    """``weight_of(p, best_plan(p, available))`` without building the plan (``steps`` from
    ``plan_steps(p)``): weights add up along the walk, so the walk's weight is the plan's."""
    return _walk(steps, available, None)


def best_plan(
    p: PlanningInputs,
    available: set[int] | frozenset[int],
    *,
    single_split: bool = False,
    extra_edge_ms: dict[int, float] | None = None,
) -> Plan:
    """The cheapest plan using only ``available`` edge blocks (device → edge → device allowed,
    or one split when ``single_split``). ``extra_edge_ms`` adds a per-block penalty (IONN's
    upload penalty) to running a block on the edge."""
    n = p.profile.n
    if single_split:
        return _best_single(p, available)
    # back[b][loc]: where the best walk to boundary b at loc (0 device, 1 edge) came from
    back: list[list[tuple[int, int] | None]] = [[None, None] for _ in range(n + 1)]
    _walk(plan_steps(p, extra_edge_ms), available, back)
    # walk back from (n, device)
    steps_taken: list[tuple[int, int]] = []
    node: tuple[int, int] | None = (n, 0)
    while node is not None:
        steps_taken.append(node)
        node = back[node[0]][node[1]]
    steps_taken.reverse()
    segments: list[Segment] = []
    for (b0, l0), (b1, _l1) in itertools.pairwise(steps_taken):
        if b1 == b0 + 1:
            where: Where = "device" if l0 == 0 else "edge"
            if segments and segments[-1].where == where and segments[-1].end == b0:
                segments[-1] = Segment(segments[-1].start, b1, where)
            else:
                segments.append(Segment(b0, b1, where))
    return _finish(p, tuple(segments))


def _finish(p: PlanningInputs, segments: tuple[Segment, ...], label: str = "") -> Plan:
    lat, en = evaluate(p, segments)
    return Plan(segments, lat, en, label)


def single_split_plan(p: PlanningInputs, k: int) -> Plan:
    n = p.profile.n
    segs = [Segment(0, k, "device")] if k > 0 else []
    if k < n:
        segs.append(Segment(k, n, "edge"))
    return _finish(p, tuple(segs))


def _best_single(p: PlanningInputs, available: set[int] | frozenset[int]) -> Plan:
    n = p.profile.n
    best = single_split_plan(p, n)
    best_w = _weight(p, best.latency_ms, best.energy_mj)
    for k in range(max(p.min_local, 0), n):
        if all(i in available for i in range(k, n)):
            cand = single_split_plan(p, k)
            w = _weight(p, cand.latency_ms, cand.energy_mj)
            if w < best_w:
                best, best_w = cand, w
    return best


def weight_of(p: PlanningInputs, plan: Plan) -> float:
    return _weight(p, plan.latency_ms, plan.energy_mj)
