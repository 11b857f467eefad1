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


def test_a_batch_takes_devices_in_turn_and_keeps_each_devices_order() -> None:
    q: FairQueue[str] = FairQueue(QueueLimits(per_device=10, total=100))
    for item in ("f:m0", "f:m1", "f:m2", "f:m3"):
        assert q.put("flood", item, 10) is None
    assert q.put("calm", "c:other", 10) is None  # not the batch's model: holds c:m back
    assert q.put("calm", "c:m", 10) is None
    assert q.put("third", "t:m", 10) is None
    got = q.take_matching(lambda s: ":m" in s, 3)
    # one per device per round: the flood does not fill the batch; calm's head does not
    # match, so its later item stays behind it
    assert got == ["f:m0", "t:m", "f:m1"]
    assert len(q) == 4 and q.nbytes == 40
    # the round goes on where it was: calm first (its turn came), then the flood
    assert _drain(q) == ["c:other", "f:m2", "c:m", "f:m3"]


def test_a_batch_takes_at_most_n_and_nothing_unmatched() -> None:
    q: FairQueue[int] = FairQueue(QueueLimits(per_device=10, total=100))
    for i in range(6):
        assert q.put(f"d{i % 3}", i) is None
    assert q.take_matching(lambda i: i % 2 == 0, 2) == [0, 2]
    assert q.take_matching(lambda i: i > 100, 5) == []
    assert sorted(_drain(q)) == [1, 3, 4, 5]


def test_a_batch_waits_for_arrivals_up_to_its_delay() -> None:
    q: FairQueue[int] = FairQueue(QueueLimits(per_device=10, total=100))
    timer = threading.Timer(0.05, lambda: (q.put("late", 1), q.put("late", 2)))
    timer.start()
    try:
        assert q.take_matching(lambda i: True, 2, wait_s=5.0) == [1, 2]  # both, not 5 s
    finally:
        timer.join()
    # an arrival that does not match wakes it, and it goes back to waiting
    threading.Timer(0.02, lambda: q.put("x", -1)).start()
    assert q.take_matching(lambda i: i >= 0, 1, wait_s=0.2) == []
    assert _drain(q) == [-1]


def test_a_waiting_batch_does_not_keep_an_idle_worker_asleep() -> None:
    """A put wakes every waiter while a batch waits: an item the batch does not take goes
    to the idle ``get`` at once, not after the batch's delay."""
    q: FairQueue[int] = FairQueue(QueueLimits(per_device=10, total=100))
    batch = threading.Thread(target=q.take_matching, args=(lambda i: i > 0, 1, 2.0))
    got: list[int | None] = []
    idle = threading.Thread(target=lambda: got.append(q.get(timeout=2.0)))
    batch.start()
    idle.start()
    threading.Event().wait(0.05)  # both waiting
    assert q.put("x", -1) is None
    idle.join(1.0)
    assert not idle.is_alive() and got == [-1]
    assert q.put("x", 5) is None
    batch.join(3)
    assert not batch.is_alive()


def test_a_closed_queue_does_not_wait_for_a_batch() -> None:
    q: FairQueue[int] = FairQueue()
    q.close()
    assert q.take_matching(lambda i: True, 4, wait_s=10.0) == []
