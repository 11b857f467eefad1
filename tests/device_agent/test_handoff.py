"""The move policy on its own: each trigger, hysteresis, hold time, a forced edge."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.handoff import EdgeView, HandoffPolicy, Move


def v(
    id: str,
    ms: float = 10.0,
    *,
    online: bool = True,
    rtt: float = 5.0,
    misses: int = 0,
    stored: int = 18,
) -> EdgeView:
    return EdgeView(id, online, ms, rtt, misses, stored)


def test_stays_when_nothing_is_better() -> None:
    p = HandoffPolicy()
    assert p.decide(v("a"), [v("b", 9.5)], now=0) is None
    assert p.decide(v("a"), [v("b", 9.5)], now=100) is None


def test_offline_current_moves_at_once_to_the_best_online_edge() -> None:
    p = HandoffPolicy()
    m = p.decide(v("a", online=False), [v("b", 30), v("c", 20), v("d", 1, online=False)], now=0)
    assert m == Move("c", "current edge offline")


def test_offline_current_and_nobody_else_stays() -> None:
    assert HandoffPolicy().decide(v("a", online=False), [v("b", online=False)], now=0) is None


def test_better_edge_needs_margin_for_the_whole_dwell_time() -> None:
    p = HandoffPolicy(margin=0.2, dwell_s=3.0, hold_s=0)
    assert p.decide(v("a", 10), [v("b", 7)], now=0) is None  # better, dwell starts
    assert p.decide(v("a", 10), [v("b", 7)], now=2.9) is None
    m = p.decide(v("a", 10), [v("b", 7)], now=3.0)
    assert m is not None and m.target == "b"


def test_a_blip_restarts_the_dwell_time() -> None:
    p = HandoffPolicy(margin=0.2, dwell_s=3.0, hold_s=0)
    p.decide(v("a", 10), [v("b", 7)], now=0)
    p.decide(v("a", 10), [v("b", 9)], now=2)  # within the margin: not better any more
    assert p.decide(v("a", 10), [v("b", 7)], now=3.5) is None
    assert p.decide(v("a", 10), [v("b", 7)], now=6.4) is None
    assert p.decide(v("a", 10), [v("b", 7)], now=6.5) is not None


def test_alone_is_deciding_with_no_others_an_edge_gone_restarts_its_dwell() -> None:
    for forget in (lambda p: p.alone(), lambda p: p.decide(v("a", 10), [], now=2)):
        p = HandoffPolicy(margin=0.2, dwell_s=3.0, hold_s=0)
        p.decide(v("a", 10), [v("b", 7)], now=0)
        forget(p)  # b gone for a while (the monitor skips the views then)
        assert p.decide(v("a", 10), [v("b", 7)], now=3.0) is None  # dwell from 3, not 0
        assert p.decide(v("a", 10), [v("b", 7)], now=6.0) is not None


def test_hold_after_a_move_blocks_non_forced_moves() -> None:
    p = HandoffPolicy(dwell_s=0, hold_s=5, miss_limit=2)
    assert p.decide(v("a", 10), [v("b", 1)], now=0) is not None  # moved to b
    assert p.decide(v("b", 10), [v("a", 1)], now=1) is None  # no flapping back
    assert p.decide(v("b", misses=5), [v("a")], now=2) is None
    assert p.decide(v("b", online=False), [v("a")], now=2) == Move("a", "current edge offline")


def test_rtt_and_deadline_misses_trigger_a_move() -> None:
    p = HandoffPolicy(rtt_limit_ms=100, miss_limit=3)
    m = p.decide(v("a", rtt=300), [v("b", 50, rtt=20)], now=0)
    assert m is not None and m.target == "b" and "rtt" in m.reason
    p = HandoffPolicy(miss_limit=3)
    m = p.decide(v("a", misses=3), [v("b", 50)], now=0)
    assert m is not None and m.target == "b" and "miss" in m.reason
    # not onto an edge that is as bad
    assert HandoffPolicy(miss_limit=3).decide(v("a", misses=3), [v("b", misses=4)], now=0) is None


def test_prefer_forces_and_holds() -> None:
    p = HandoffPolicy()
    assert p.decide(v("a", 1), [v("b", 50)], prefer="b", now=0) == Move("b", "preferred")
    assert p.decide(v("b", 50), [v("a", 1)], prefer="b", now=100) is None  # stays on b
    # a preferred edge that is offline does not block the usual rules
    assert p.decide(
        v("a", online=False), [v("b", online=False), v("c")], prefer="b", now=200
    ) == Move("c", "current edge offline")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        HandoffPolicy(margin=1.5)
    with pytest.raises(ValueError):
        HandoffPolicy(miss_limit=0)


def _views(ids: st.SearchStrategy[str]) -> st.SearchStrategy[EdgeView]:
    return st.builds(
        EdgeView,
        id=ids,
        online=st.booleans(),
        predicted_ms=st.floats(0.1, 1e4),
        rtt_ms=st.floats(0.1, 1e3),
        misses=st.integers(0, 10),
        stored=st.integers(0, 18),
    )


@given(
    cur=_views(st.just("a")),
    others=st.lists(_views(st.sampled_from("abcd")), max_size=4),
    times=st.lists(st.floats(0, 100), min_size=1, max_size=5),
    prefer=st.sampled_from([None, "a", "b", "z"]),
)
def test_never_moves_to_an_offline_edge_or_to_itself(
    cur: EdgeView, others: list[EdgeView], times: list[float], prefer: str | None
) -> None:
    p = HandoffPolicy(dwell_s=1.0)
    for t in sorted(times):
        m = p.decide(cur, others, prefer=prefer, now=t)
        if m is not None:
            assert m.target != "a"
            assert any(o.id == m.target and o.online for o in others)
