from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotoffload.planning import (
    PLANNERS,
    ChainProfile,
    Estimates,
    Plan,
    PlanningInputs,
    Segment,
    best_plan,
    evaluate,
    make_planner,
    single_split_plan,
)
from iotoffload.planning.cost import best_weight, plan_steps, weight_of
from iotoffload.planning.planners import IonnPlanner

ALL3 = frozenset(range(3))


def three(**est: float) -> PlanningInputs:
    """d = 10 ms a block on the device, e = 1 ms on the edge; input 1000 B, boundaries 100 B,
    output 10 B; 1 MB/s (1000 B per ms), no RTT unless given."""
    prof = ChainProfile((10.0, 10.0, 10.0), (1.0, 1.0, 1.0), (1000, 100, 100, 10), (500, 500, 500))
    e = dataclasses.replace(Estimates(bandwidth_Bps=1e6, rtt_ms=0.0), **est)
    return PlanningInputs(prof, e)


def test_hand_checked_plans() -> None:
    p = three()
    assert single_split_plan(p, 3).latency_ms == pytest.approx(30.0)
    whole = best_plan(p, ALL3)
    assert whole.describe() == "E[0,3)" and whole.latency_ms == pytest.approx(1 + 3 + 0.01)
    rear = best_plan(p, frozenset({1, 2}))
    assert rear.describe() == "D[0,1) E[1,3)"
    assert rear.latency_ms == pytest.approx(10 + 0.1 + 2 + 0.01)
    middle = best_plan(p, frozenset({1}))  # device -> edge -> device
    assert middle.describe() == "D[0,1) E[1,2) D[2,3)"
    assert middle.latency_ms == pytest.approx(10 + 0.1 + 1 + 0.1 + 10)
    assert make_planner("neurosurgeon").plan(p, frozenset({1})).describe() == "D[0,3)"


def test_the_overhead_around_device_blocks_can_make_offloading_pay() -> None:
    # the edge at 11 ms a block: E[0,3) costs 1 + 33 + 0.01 ms against 30 locally; with 20 %
    # of the blocks' time spent around them on the device, local costs 36
    p = three(load_factor=11.0)
    assert best_plan(p, ALL3).describe() == "D[0,3)"
    around = three(load_factor=11.0, device_overhead=0.2)
    assert single_split_plan(around, 3).latency_ms == pytest.approx(36.0)
    plan = best_plan(around, ALL3)
    assert plan.describe() == "E[0,3)" and plan.latency_ms == pytest.approx(34.01)
    steps = plan_steps(around)
    assert steps.device == pytest.approx((12.0, 12.0, 12.0))  # the upload order sees it too


def test_privacy_keeps_the_first_blocks_on_the_device() -> None:
    p = dataclasses.replace(three(), min_local=2)
    plan = best_plan(p, ALL3)
    assert plan.describe() == "D[0,2) E[2,3)" and plan.latency_ms == pytest.approx(21.11)
    for name in PLANNERS:
        assert not make_planner(name).plan(p, ALL3).edge_blocks & {0, 1}, name


def test_load_moves_the_split_toward_the_device() -> None:
    idle, loaded = three(), three(load_factor=20.0, queue_ms=5.0)
    assert make_planner("loadpart").plan(idle, ALL3).split == 0
    assert make_planner("loadpart").plan(loaded, ALL3).split == 3  # all local now
    assert make_planner("neurosurgeon").plan(loaded, ALL3).split == 0  # load-oblivious
    assert make_planner("auto").plan(loaded, ALL3).split == 3


def test_energy_objective_trades_latency_for_energy() -> None:
    # a fast but power-hungry radio: sending the input costs more energy than computing
    p = dataclasses.replace(three(bandwidth_Bps=2e5), objective="energy")
    lat_plan = best_plan(dataclasses.replace(p, objective="latency"), ALL3)
    en_plan = best_plan(p, ALL3)
    assert en_plan.energy_mj <= lat_plan.energy_mj
    assert en_plan.latency_ms >= lat_plan.latency_ms


def test_edge_planner_waits_for_the_whole_model() -> None:
    p = three()
    assert make_planner("edge").plan(p, frozenset({1, 2})).describe() == "D[0,3)"
    assert make_planner("edge").plan(p, ALL3).describe() == "E[0,3)"


def test_unknown_planner() -> None:
    with pytest.raises(ValueError, match="unknown planner 'magic'"):
        make_planner("magic")


@st.composite
def inputs(draw: st.DrawFn) -> PlanningInputs:
    n = draw(st.integers(1, 10))
    ms = st.floats(0.05, 50.0)
    prof = ChainProfile(
        tuple(draw(st.lists(ms, min_size=n, max_size=n))),
        tuple(draw(st.lists(ms, min_size=n, max_size=n))),
        tuple(draw(st.lists(st.integers(4, 2_000_000), min_size=n + 1, max_size=n + 1))),
        tuple(draw(st.lists(st.integers(100, 10_000_000), min_size=n, max_size=n))),
    )
    est = Estimates(
        bandwidth_Bps=draw(st.floats(1e4, 1e9)),
        rtt_ms=draw(st.floats(0.0, 50.0)),
        load_factor=draw(st.floats(0.5, 10.0)),
        queue_ms=draw(st.floats(0.0, 50.0)),
    )
    return PlanningInputs(prof, est, min_local=draw(st.integers(0, n)))


def subsets(n: int) -> st.SearchStrategy[frozenset[int]]:
    return st.frozensets(st.integers(0, max(n - 1, 0)), max_size=n) if n else st.just(frozenset())


@settings(max_examples=150, deadline=None)
@given(inputs(), st.data())
def test_plans_only_use_available_blocks_and_cover_the_chain(
    p: PlanningInputs, data: st.DataObject
) -> None:
    avail = data.draw(subsets(p.profile.n))
    for name in PLANNERS:
        plan = make_planner(name).plan(p, avail)
        assert plan.edge_blocks <= set(avail), name
        assert not plan.edge_blocks & set(range(p.min_local)), name
        covered = [i for s in plan.segments for i in range(s.start, s.end)]
        assert covered == list(range(p.profile.n)), name
        # the plan's figures are its planner's prediction (load-oblivious ones ignore load)
        view = (
            p
            if name in ("auto", "loadpart", "local", "edge")
            else dataclasses.replace(p, load_aware=False)
        )
        assert evaluate(view, plan.segments) == pytest.approx((plan.latency_ms, plan.energy_mj))


@settings(max_examples=150, deadline=None)
@given(inputs(), st.data())
def test_neurosurgeon_is_brute_force_over_k(p: PlanningInputs, data: st.DataObject) -> None:
    avail = data.draw(subsets(p.profile.n))
    q = dataclasses.replace(p, load_aware=False)
    n = p.profile.n
    valid = [k for k in range(p.min_local, n + 1) if all(i in avail for i in range(k, n))]
    brute = min(single_split_plan(q, k).latency_ms for k in valid)
    assert make_planner("neurosurgeon").plan(p, avail).latency_ms == pytest.approx(brute)
    # the general plan (device -> edge -> device allowed) is never worse than any single split
    assert (
        best_plan(p, avail).latency_ms
        <= min(single_split_plan(p, k).latency_ms for k in valid) + 1e-9
    )


@settings(max_examples=150, deadline=None)
@given(inputs(), st.floats(1.5, 100.0), st.data())
def test_more_bandwidth_never_makes_the_plan_slower(
    p: PlanningInputs, factor: float, data: st.DataObject
) -> None:
    avail = data.draw(subsets(p.profile.n))
    faster = dataclasses.replace(
        p,
        estimates=dataclasses.replace(
            p.estimates, bandwidth_Bps=p.estimates.bandwidth_Bps * factor
        ),
    )
    for name in ("auto", "loadpart", "neurosurgeon", "ionn", "efficiency"):
        slow_plan = make_planner(name).plan(p, avail)
        fast_plan = make_planner(name).plan(faster, avail)
        assert fast_plan.latency_ms <= slow_plan.latency_ms + 1e-9, name


@settings(max_examples=40, deadline=None)
@given(inputs())
def test_upload_orders_cover_what_the_final_plan_needs(p: PlanningInputs) -> None:
    n = p.profile.n
    for name in ("ionn", "efficiency", "auto", "neurosurgeon", "loadpart", "edge"):
        pl = make_planner(name)
        order = pl.upload_order(p)
        assert sorted(order) == list(range(n)), name  # a permutation: everything, once
    # IONN's paths alone hold a final plan that is optimal up to the upload penalty left at
    # its last level (k > 0.999 stops it: (1 - k) <= 0.8**30 of each block's upload time)
    q = dataclasses.replace(p, load_aware=False)
    ionn = IonnPlanner()
    via_paths = best_plan(q, frozenset(ionn.path_order(p))).latency_ms
    residual = 0.8**30 * sum(q.estimates.transfer_ms(u) for u in p.profile.upload_bytes)
    assert via_paths <= best_plan(q, frozenset(range(n))).latency_ms + residual + 1e-9


@settings(max_examples=150, deadline=None)
@given(inputs(), st.data())
def test_energy_objective_never_uses_more_energy(p: PlanningInputs, data: st.DataObject) -> None:
    avail = data.draw(subsets(p.profile.n))
    lat = best_plan(dataclasses.replace(p, objective="latency"), avail)
    en = best_plan(dataclasses.replace(p, objective="energy"), avail)
    assert en.energy_mj <= lat.energy_mj + 1e-9


def _all_walks(n: int, min_local: int, avail: frozenset[int]) -> list[tuple[Segment, ...]]:
    """Every plan: each block on the device or, when held and not private, on the edge."""
    walks = []
    for mask in range(1 << n):
        where = ["edge" if mask >> i & 1 else "device" for i in range(n)]
        if any(w == "edge" and (i not in avail or i < min_local) for i, w in enumerate(where)):
            continue
        segs: list[Segment] = []
        for i, w in enumerate(where):
            if segs and segs[-1].where == w:
                segs[-1] = Segment(segs[-1].start, i + 1, segs[-1].where)
            else:
                segs.append(Segment(i, i + 1, w))  # type: ignore[arg-type]
        walks.append(tuple(segs))
    return walks


@settings(max_examples=150, deadline=None)
@given(inputs(), st.data())
def test_best_weight_is_the_best_plans_weight_and_the_true_optimum(
    p: PlanningInputs, data: st.DataObject
) -> None:
    objective = data.draw(st.sampled_from(["latency", "energy", "mix"]))
    p = dataclasses.replace(p, objective=objective)
    avail = data.draw(subsets(p.profile.n))
    steps = plan_steps(p)
    w = best_weight(p, avail, steps)
    plan = best_plan(p, avail)
    assert w == pytest.approx(weight_of(p, plan))
    brute = min(
        weight_of(p, Plan(s, *evaluate(p, s))) for s in _all_walks(p.profile.n, p.min_local, avail)
    )
    assert w == pytest.approx(brute)
