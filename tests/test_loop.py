"""AgentLoop: one thread owns the state; other threads post or hop in."""

from __future__ import annotations

import asyncio
import threading

import pytest

from iotoffload.loop import AgentLoop, LoopClosedError


def test_posts_run_in_order_on_the_loop_thread_and_close_joins_it() -> None:
    lp = AgentLoop("t-loop")
    seen: list[tuple[int, str]] = []
    for i in range(100):
        lp.post(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert lp.call(lambda: len(seen)) == 100  # posted before: handled before
    assert [i for i, _ in seen] == list(range(100))
    assert {name for _, name in seen} == {"t-loop"}
    lp.close()
    assert not lp.thread.is_alive()
    lp.post(lambda: seen.append((-1, "late")))  # dropped, not raised
    assert lp.call(lambda: len(seen)) == 100  # after close: runs here, nobody else owns it


def test_a_failing_callback_does_not_stop_the_loop() -> None:
    lp = AgentLoop("t-loop")
    try:
        lp.post(lambda: 1 / 0)
        assert lp.call(lambda: "alive") == "alive"
    finally:
        lp.close()


def test_run_returns_results_times_out_and_refuses_after_close() -> None:
    lp = AgentLoop("t-loop")

    async def slow() -> int:
        await asyncio.sleep(5)
        return 1

    async def fast() -> int:
        return await lp.blocking(lambda: 41) + 1

    try:
        assert lp.run(fast(), 2) == 42
        with pytest.raises(TimeoutError):
            lp.run(slow(), 0.05)
        # a task still running at close is cancelled, and close does not wait for it
        pending = lp.spawn(slow())
    finally:
        lp.close()
    assert pending.cancelled()
    with pytest.raises(LoopClosedError):
        lp.run(fast())
