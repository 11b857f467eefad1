"""Latency and energy of any plan, and the best plan over the blocks the edge holds.

A plan is a walk along the chain's boundaries, on the device or on the edge. Costs are additive
per step, so the best walk is a shortest path over 2 × (N + 1) states (device/edge at each
boundary): O(N), well under a millisecond for an 18-block chain.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

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
    lat = energy = 0.0
    for s in segments:
        if s.where == "device":
            t = sum(pr.device_ms[s.start : s.end]) * est.device_factor
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
    pr, est, pw = p.profile, p.estimates, p.power
    extra = extra_edge_ms or {}
    # cost[b][loc]: best weight reaching boundary b at loc (0 device, 1 edge); back-pointers
    cost = [[INF, INF] for _ in range(n + 1)]
    back: list[list[tuple[int, int] | None]] = [[None, None] for _ in range(n + 1)]
    cost[0][0] = 0.0

    def relax(b: int, loc: int, nb: int, nloc: int, w: float) -> None:
        if cost[b][loc] + w < cost[nb][nloc]:
            cost[nb][nloc] = cost[b][loc] + w
            back[nb][nloc] = (b, loc)

    for b in range(n + 1):
        for _ in range(2):  # a switch at b may enable the other state at the same b
            if b >= p.min_local:
                t = est.transfer_ms(pr.boundary_bytes[b])
                relax(
                    b, 0, b, 1, _weight(p, t + _queue(p), pw.transmit_w * t + pw.idle_w * _queue(p))
                )
                relax(b, 1, b, 0, _weight(p, t, pw.idle_w * t))
        if b == n:
            break
        d = pr.device_ms[b] * est.device_factor
        relax(b, 0, b + 1, 0, _weight(p, d, pw.compute_w * d))
        if b in available and b >= p.min_local:
            e = _edge_ms(p, b) + extra.get(b, 0.0)
            relax(b, 1, b + 1, 1, _weight(p, e, pw.idle_w * e))
    # walk back from (n, device)
    steps: list[tuple[int, int]] = []
    node: tuple[int, int] | None = (n, 0)
    while node is not None:
        steps.append(node)
        node = back[node[0]][node[1]]
    steps.reverse()
    segments: list[Segment] = []
    for (b0, l0), (b1, _l1) in itertools.pairwise(steps):
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
