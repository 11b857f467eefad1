"""The query queue's policy on hand-checkable cases: bounds per device, in total and in
bytes, and the round between devices."""

from __future__ import annotations

import threading

from edge_agent.fair import FairQueue, QueueLimits


def _drain(q: FairQueue[str]) -> list[str]:
    out = []
    while (item := q.get(timeout=0)) is not None:
        out.append(item)
    return out


def test_devices_take_turns_whoever_floods() -> None:
    q: FairQueue[str] = FairQueue(QueueLimits(per_device=10, total=100))
    for i in range(5):
        assert q.put("flood", f"f{i}") is None
    assert q.put("calm", "c0") is None
    assert q.put("other", "o0") is None
    assert q.put("calm", "c1") is None
    # the flood's first item came first; then each device in turn, oldest first
    assert _drain(q) == ["f0", "c0", "o0", "f1", "c1", "f2", "f3", "f4"]
    assert len(q) == 0 and q.nbytes == 0


def test_per_device_bound_leaves_others_room() -> None:
    q: FairQueue[int] = FairQueue(QueueLimits(per_device=2, total=10))
    assert q.put("a", 1) is None and q.put("a", 2) is None
    why = q.put("a", 3)
    assert why is not None and "limit 2" in why and "of a" in why
    assert q.put("b", 4) is None
    assert len(q) == 3 and q.queued_for("a") == 2


def test_total_and_byte_bounds() -> None:
    q: FairQueue[int] = FairQueue(QueueLimits(per_device=10, total=3, max_bytes=100))
    assert q.put("a", 1, 60) is None
    why = q.put("b", 2, 50)
    assert why is not None and "bytes" in why
    assert q.put("b", 3, 40) is None
    assert q.put("c", 4, 0) is None
    why = q.put("d", 5, 0)
    assert why is not None and "limit 3" in why
    q.get(timeout=0)
    assert q.put("d", 5, 0) is None  # room again once one is taken
    assert q.nbytes == 40


def test_one_item_always_fits_an_empty_queue() -> None:
    q: FairQueue[int] = FairQueue(QueueLimits(max_bytes=10))
    assert q.put("a", 1, 1000) is None  # a big query alone is not refused for its size
    assert q.put("a", 2, 1) is not None


def test_close_returns_what_was_left_and_wakes_getters() -> None:
    q: FairQueue[int] = FairQueue()
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.put("a", 1)
    t.join(5)
    assert got == [1]
    q.put("a", 2)
    q.put("b", 3)
    t = threading.Thread(target=lambda: got.append(q.get()))
    assert sorted(q.close()) == [2, 3]
    t.start()
    t.join(5)
    assert not t.is_alive() and got == [1, None]
    assert q.put("a", 4) is not None  # closed


def test_poke_wakes_a_getter_with_other_work() -> None:
    q: FairQueue[int] = FairQueue()
    flag = threading.Event()
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(wake=flag.is_set)))
    t.start()
    flag.set()
    q.poke()
    t.join(5)
    assert not t.is_alive() and got == [None]
