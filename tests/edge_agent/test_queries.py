"""Queries over a real mosquitto: many clients and many threads at once, every result
counted on the loop before it is sent."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from edge_agent.payoff import BatchPayoff
from edge_agent.queries import COUNT_EVERY, BatchLimits
from edge_agent.stats import EdgeStats
from edge_agent.workers import WorkerProcess
from iotoffload.transport.frame import (
    Error,
    Query,
    Result,
    encode_tensor_frame,
    tensor_of,
)
from iotoffload.transport.mqtt import Message
from tests.edge_agent.conftest import Harness, RawClient, TinyModel, tiny_model, wait_until

pytestmark = pytest.mark.integration

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def test_concurrent_queries_from_several_clients_are_all_counted(harness: Harness) -> None:
    model = tiny_model()
    edge = harness.edge(workers=3)
    devs = [harness.client(f"dev{k}") for k in range(4)]
    devs[0].control(model.announce(devs[0].device))
    devs[0].inventory()
    devs[0].upload(model)
    per_client = 30
    failures: list[BaseException] = []

    def run(k: int) -> None:
        dev = devs[k]
        try:
            xs = [X + k * 100 + j for j in range(per_client)]
            for j, x in enumerate(xs):  # all sent at once: they queue on the edge
                dev.send(
                    harness.topics.edge_query("edge1", dev.device),
                    dev.query_frame(model, f"q{k}-{j}", x.astype(np.float32)),
                )
            for j, x in enumerate(xs):
                np.testing.assert_allclose(
                    dev.result(f"q{k}-{j}"), model.expected(x, 0, 3), rtol=0, atol=1e-5
                )
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(devs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    # each result is counted on the loop right after it is sent: none is lost
    wait_until(lambda: edge.stats.queries == per_client * len(devs), 5, "every result counted")
    wait_until(lambda: edge.load_factor() == 0, 5, "no query outstanding")
    s = edge.stats
    assert s.queries == per_client * len(devs)
    assert s.in_flight == 0 and s.errors == 0
    assert s.exec_ms_ewma > 0
    inv = edge.inventory(model.model_id)
    assert inv.stored == inv.loaded == [0, 1, 2] and set(inv.block_ms) == {0, 1, 2}


def test_stats_hammered_from_many_threads_lose_nothing(harness: Harness) -> None:
    """Messages handed to the edge's handlers from 8 threads at once, as paho threads would:
    queries and refusals counted on the loop, none lost."""
    model = tiny_model(2)
    edge = harness.edge(workers=4, queue_per_device=2000, queue_total=2000)  # none is busy
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    topic = harness.topics.edge_query("edge1", dev.device)
    good, bad, n_threads = 150, 25, 8
    unknown = "0" * 64
    go = threading.Barrier(n_threads)

    def hammer(k: int) -> None:
        go.wait()
        for j in range(good):
            frame = dev.query_frame(model, f"h{k}-{j}", X)
            edge._on_query_message(Message(topic, frame))
        for j in range(bad):
            frame = encode_tensor_frame(
                Query,
                X,
                request_id=f"b{k}-{j}",
                device=dev.device,
                model_id=unknown,
                start=0,
                end=1,
                deadline_ms=60_000,
            )
            edge._on_query_message(Message(topic, frame))

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    total = n_threads * (good + bad)
    wait_until(lambda: (s := edge.stats).queries + s.errors == total, 60, "every query answered")
    s = edge.stats
    assert s.queries == n_threads * good, s.error_codes
    assert s.error_codes == {"unknown_model": n_threads * bad}
    wait_until(lambda: edge.load_factor() == 0, 5, "no query outstanding")
    assert edge.stats.in_flight == 0


def test_stats_are_written_on_the_edge_loop_only(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One owner: every write to the edge's counters (uploads, queries, errors) happens on
    ``edge-loop`` — a write from a network or worker thread could lose an update."""
    model = tiny_model()
    edge = harness.edge(workers=2)
    own = edge._stats
    writers: list[str] = []
    setattr_ = EdgeStats.__setattr__

    def spy(self: EdgeStats, name: str, value: object) -> None:
        if self is own:
            writers.append(threading.current_thread().name)
        setattr_(self, name, value)

    monkeypatch.setattr(EdgeStats, "__setattr__", spy)
    dev = harness.client("dev0")
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    for j in range(10):
        dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(model, f"w{j}", X))
    for j in range(10):
        dev.result(f"w{j}")
    dev.send(harness.topics.edge_query("edge1", dev.device), b"junk")  # an error is counted too
    wait_until(lambda: edge.stats.errors >= 1, 5)
    assert writers and set(writers) == {"edge-loop"}, sorted(set(writers))


def test_results_not_yet_counted_stay_bounded_without_status_reads(harness: Harness) -> None:
    """A flood of queries on an edge whose loop never reads its counters (no status task
    tick): the results waiting to be counted stay below COUNT_EVERY, and none is lost."""
    model = tiny_model()
    edge = harness.edge(status_interval=3600.0, queue_per_device=1000, queue_total=1000)
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    n = COUNT_EVERY + 60
    for j in range(n):
        dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(model, f"f{j}", X))
    for j in range(n):
        dev.result(f"f{j}")
    wait_until(lambda: edge.load_factor() == 0, 5, "no query outstanding")
    assert edge.queries._done.qsize() < COUNT_EVERY  # the workers asked the loop to count
    assert edge.stats.queries == n


def _gathered(harness: Harness, model: TinyModel, n: int, **config: Any) -> list[RawClient]:
    """An edge (one worker) that waits for batches to fill, and ``n`` devices of ``model``
    (uploaded by the first)."""
    harness.edge(workers=1, **config)
    devs = [harness.client(f"dev{k}") for k in range(n)]
    for d in devs:
        d.control(model.announce(d.device))
        d.inventory()
    devs[0].upload(model)
    return devs


def test_queries_of_several_devices_run_as_one_batch(harness: Harness) -> None:
    """Four devices' queries for the same blocks, sent together to an edge that waits up to
    300 ms for a batch: run as one batch of 4, each device answered with its own numbers,
    the batch size and the batch's time in every Result."""
    model = tiny_model()
    devs = _gathered(harness, model, 4, batch_delay_ms=300.0, max_batch=8)
    edge = harness.edges[0]
    for k, d in enumerate(devs):
        d.send(harness.topics.edge_query("edge1", d.device), d.query_frame(model, f"b{k}", X + k))
    got = []
    for k, d in enumerate(devs):
        h, body = d.take(lambda h, k=k: isinstance(h, Result | Error) and h.request_id == f"b{k}")
        assert isinstance(h, Result), h
        np.testing.assert_array_equal(tensor_of(h, memoryview(body)), model.expected(X + k, 0, 3))
        got.append(h)
    assert [h.batch for h in got] == [4, 4, 4, 4]
    assert len({h.exec_ms for h in got}) == 1  # one run for all
    assert all(len(h.block_ms) == 3 for h in got)
    wait_until(lambda: edge.stats.queries == 4, 5, "every result counted")
    assert edge.queries.batch_ewma > 1.0


def test_batches_wait_for_nothing_by_default_and_a_lone_query_runs_alone(
    harness: Harness,
) -> None:
    model = tiny_model()
    (dev,) = _gathered(harness, model, 1)
    dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(model, "alone", X))
    h, _ = dev.take(lambda h: isinstance(h, Result | Error) and h.request_id == "alone")
    assert isinstance(h, Result) and h.batch == 1
    assert h.queue_ms < 250  # not held back for a batch (the default delay is 0)


def test_batches_off_with_max_batch_1(harness: Harness) -> None:
    model = tiny_model()
    devs = _gathered(harness, model, 3, batch_delay_ms=200.0, max_batch=1)
    for k, d in enumerate(devs):
        d.send(harness.topics.edge_query("edge1", d.device), d.query_frame(model, f"o{k}", X))
    for k, d in enumerate(devs):
        h, _ = d.take(lambda h, k=k: isinstance(h, Result | Error) and h.request_id == f"o{k}")
        assert isinstance(h, Result) and h.batch == 1


def test_a_batch_that_fails_unexpectedly_runs_one_by_one(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a block's fault: any error out of a batched run (here a bug's ValueError) leaves
    no query unanswered and the worker serving; the queries run one by one."""
    model = tiny_model()
    devs = _gathered(harness, model, 3, batch_delay_ms=300.0, max_batch=8)
    calls: list[int] = []

    def broken(
        self: WorkerProcess, chain: Any, start: int, end: int, bodies: Any, **kw: Any
    ) -> Any:
        calls.append(len(bodies))
        raise ValueError("a bug in the batch path")

    monkeypatch.setattr(WorkerProcess, "run_batch", broken)
    for k, d in enumerate(devs):
        d.send(harness.topics.edge_query("edge1", d.device), d.query_frame(model, f"u{k}", X + k))
    for k, d in enumerate(devs):
        h, body = d.take(lambda h, k=k: isinstance(h, Result | Error) and h.request_id == f"u{k}")
        assert isinstance(h, Result) and h.batch == 1, h
        np.testing.assert_array_equal(tensor_of(h, memoryview(body)), model.expected(X + k, 0, 3))
    assert calls == [3]  # tried once as a batch, then its model runs unbatched
    d = devs[0]
    d.send(harness.topics.edge_query("edge1", d.device), d.query_frame(model, "after", X))
    h, _ = d.take(lambda h: isinstance(h, Result | Error) and h.request_id == "after")
    assert isinstance(h, Result)  # the worker thread lives on


def test_a_batch_holds_at_most_max_bytes_of_tensors(harness: Harness) -> None:
    """With room for two queries' input and output, four queued queries run as two batches."""
    model = tiny_model()
    devs = _gathered(harness, model, 4, batch_delay_ms=300.0, max_batch=8)
    edge = harness.edges[0]
    edge.queries.batching = replace(edge.queries.batching, max_bytes=2 * 2 * X.nbytes)
    for k, d in enumerate(devs):
        d.send(harness.topics.edge_query("edge1", d.device), d.query_frame(model, f"m{k}", X + k))
    sizes = []
    for k, d in enumerate(devs):
        h, _ = d.take(lambda h, k=k: isinstance(h, Result | Error) and h.request_id == f"m{k}")
        assert isinstance(h, Result), h
        sizes.append(h.batch)
    assert max(sizes) == 2 and sorted(sizes) == [2, 2, 2, 2]


def test_batch_size_for_tensor_sizes() -> None:
    b = BatchLimits(max_batch=8, max_bytes=1000)
    assert b.size_for(100, 100) == 5  # 1000 // 200
    assert b.size_for(10, 10) == 8  # max_batch
    assert b.size_for(600, 600) == 1  # one query always runs
    assert BatchLimits(max_batch=1).size_for(1, 1) == 1


def test_a_block_range_whose_batches_do_not_pay_runs_one_by_one(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that cost 0.95x per query of one by one (above min_gain 0.9; the worker's
    judged gain, as no query ran alone): its range runs one query at a time from then on, so
    no query waits for others' compute for nothing."""
    model = tiny_model()
    devs = _gathered(harness, model, 3, batch_delay_ms=300.0, max_batch=8)
    harness.edges[0].queries._payoff = BatchPayoff(0.9, settle=1)  # decide on one batch
    real = WorkerProcess.run_batch
    calls: list[int] = []

    def no_gain(self: WorkerProcess, *a: Any, **kw: Any) -> Any:
        outs, times, _ = real(self, *a, **kw)
        calls.append(len(outs))
        return outs, times, 0.95

    monkeypatch.setattr(WorkerProcess, "run_batch", no_gain)

    def round_(tag: str) -> list[int]:
        for k, d in enumerate(devs):
            q = d.query_frame(model, f"{tag}{k}", X + k)
            d.send(harness.topics.edge_query("edge1", d.device), q)
        sizes = []
        for k, d in enumerate(devs):
            h, body = d.take(
                lambda h, k=k: isinstance(h, Result | Error) and h.request_id == f"{tag}{k}"
            )
            assert isinstance(h, Result), h
            np.testing.assert_array_equal(
                tensor_of(h, memoryview(body)), model.expected(X + k, 0, 3)
            )
            sizes.append(h.batch)
        return sizes

    assert round_("a") == [3, 3, 3]
    assert round_("b") == [1, 1, 1] and calls == [3]
