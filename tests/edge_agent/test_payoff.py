"""When batching a block range stops: hand-checkable timings."""

from __future__ import annotations

import pytest

from edge_agent.payoff import SETTLE, BatchPayoff


def test_a_range_whose_batches_save_little_is_decided_after_settling() -> None:
    p = BatchPayoff(min_gain=0.9)
    p.single("r", 500.0)  # the first single run (it may have made the sessions): left out
    p.single("r", 10.0)
    assert p.batched("r", 4, 39.0, None) is None  # judging its blocks: not counted
    for _ in range(SETTLE - 1):
        assert p.batched("r", 4, 38.0, 0.99) is None  # 9.5 ms a query: settling
    assert p.batched("r", 4, 38.0, 0.99) == pytest.approx(0.95)  # 9.5 / 10 > 0.9: stop
    assert p.batched("r", 4, 38.0, 0.99) is None  # decided once


def test_a_range_whose_batches_pay_keeps_batching() -> None:
    p = BatchPayoff(min_gain=0.9)
    p.single("r", 3.0)
    p.single("r", 3.0)
    for _ in range(SETTLE + 3):
        # 2 ms a query against 3 alone, though the runtime alone judged it 0.95
        assert p.batched("r", 8, 16.0, 0.95) is None


def test_without_single_runs_the_workers_judged_gain_decides() -> None:
    p = BatchPayoff(min_gain=0.9, settle=1)
    assert p.batched("a", 2, 10.0, 0.97) == pytest.approx(0.97)
    assert p.batched("b", 2, 10.0, 0.5) is None


def test_ranges_are_apart_and_bounded() -> None:
    p = BatchPayoff(min_gain=0.9, settle=1)
    p.single("fast", 100.0)
    p.single("fast", 100.0)
    assert p.batched("fast", 2, 20.0, 0.99) is None  # 10 vs 100 alone
    assert p.batched("slow", 2, 20.0, 0.99) == pytest.approx(0.99)  # no singles of its own
    for i in range(5000):
        p.single(i, 1.0)
        p.single(i, 1.0)
    assert len(p._single) == 4096
    assert 4999 in p._single and 0 not in p._single  # the least recently updated went


def test_a_figure_that_is_not_a_number_does_not_keep_batching() -> None:
    p = BatchPayoff(min_gain=0.9, settle=1)
    assert p.batched("r", 2, float("nan"), 0.5) is None  # a time that is no number: not counted
    assert p.batched("r", 2, 10.0, float("nan")) == 1.0  # no sensible ratio: stop batching
    p.single("s", float("nan"))  # ignored
    assert "s" not in p._single
