"""Answers: the one answer of each query, whichever thread gets there first."""

from __future__ import annotations

import threading

from device_agent.answers import Answers


def test_first_answer_wins_and_the_rest_are_told() -> None:
    a: Answers[str] = Answers()
    fut = a.open("q")
    assert a.answer("q", "result") and not a.answer("q", "deadline passed")
    assert fut.result(0) == "result" and len(a) == 0
    assert not a.answer("never-opened", "x")


def test_racing_threads_give_each_query_exactly_one_answer() -> None:
    """Eight threads answer the same 500 queries at once (a result, its deadline, the edge
    going offline, ...): each query is answered once, by the thread that says it won."""
    a: Answers[int] = Answers()
    futs = {f"q{i}": a.open(f"q{i}") for i in range(500)}
    wins: list[list[str]] = [[] for _ in range(8)]
    go = threading.Barrier(8)

    def racer(k: int) -> None:
        go.wait()
        for rid in futs:
            if a.answer(rid, k):
                wins[k].append(rid)

    threads = [threading.Thread(target=racer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [rid for w in wins for rid in w]
    assert sorted(won) == sorted(futs)  # every query once, none twice
    for k, w in enumerate(wins):
        assert all(futs[rid].result(0) == k for rid in w)


def test_close_answers_waiting_and_later_queries() -> None:
    a: Answers[str] = Answers()
    waiting = a.open("q1")
    assert a.close("agent closed") == ["q1"]
    assert waiting.result(0) == "agent closed"
    late = a.open("q2")
    assert late.done() and late.result(0) == "agent closed"
    assert not a.answer("q2", "result") and len(a) == 0
