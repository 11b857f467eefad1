"""The edge's retained status over a real mosquitto: an ``EdgeStatus``, online then offline."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from iotoffload.client import AppClient
from iotoffload.transport.frame import ListModels, ModelList
from iotoffload.transport.mqtt import Message
from iotoffload.transport.status import EdgeStatus
from tests.edge_agent.conftest import Harness, TinyModel, _add_block, tiny_model, wait_until

pytestmark = pytest.mark.integration


def test_status_is_an_edge_status(harness: Harness) -> None:
    model = tiny_model()
    edge = harness.edge()
    dev = harness.client()
    got: list[EdgeStatus] = []
    seen = threading.Event()

    def on_status(m: Message) -> None:
        st = EdgeStatus.parse(m.payload)
        assert st is not None
        got.append(st)
        if st.state == "online" and st.blocks == 3 and st.providers_in_use:
            seen.set()  # its workers' sessions were made (the status says on what)

    dev.link.subscribe(harness.topics.edge_status("edge1"), on_status)
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    assert seen.wait(5)
    st = got[-1]
    assert st.edge == "edge1" and st.models == [model.model_id] and st.broker == edge.broker_url
    assert st.load.in_flight == 0 and st.transfer.blocks_pushed == 0
    assert st.providers == ["CPUExecutionProvider"]  # what its workers are given
    assert st.providers_in_use == ["CPUExecutionProvider"]  # what their sessions run on
    edge.stop()
    wait_until(lambda: got[-1].state == "offline", 5, "the offline status")


def test_status_stays_small_and_is_not_republished_per_announce(harness: Harness) -> None:
    """300 one-block models announced in a burst: the status lists the first
    ``status_max_models`` and counts the rest, and subscribers get a few statuses, not one
    per announce (3000 announces once grew it to 82 KB, each republished)."""
    edge = harness.edge(status_interval=3600.0, status_max_models=16, device_max_models=1000)
    got: list[tuple[int, EdgeStatus]] = []
    lock = threading.Lock()

    def on_status(m: Message) -> None:
        st = EdgeStatus.parse(m.payload)
        assert st is not None
        with lock:
            got.append((len(m.payload), st))

    watcher = harness.client("watcher")
    watcher.link.subscribe(harness.topics.edge_status("edge1"), on_status)
    wait_until(lambda: bool(got), 5, "the first status")
    before = len(got)
    dev = harness.client("dev1")
    n = 300
    for k in range(n):
        dev.control(TinyModel([_add_block(1000.0 + k)]).announce("dev1"))
    for _ in range(n):
        dev.inventory(30)
    wait_until(lambda: got[-1][1].models_total == n, 10, "a status counting every model")
    size, st = got[-1]
    assert len(st.models) == 16 and size < 4096
    statuses = len(got) - before
    assert statuses < n / 10, f"{statuses} statuses for {n} announces"
    assert edge.store.model_ids() and len(edge.store.model_ids()) == n
    # the full list on request: every model, a page at a time from an offset
    with AppClient(harness.url, "dash") as app:
        assert app.models("edge1") == edge.store.model_ids()
    dev.control(ListModels(device="dev1", offset=n - 10))
    page, _ = dev.take(lambda h: isinstance(h, ModelList), 10)
    assert isinstance(page, ModelList)
    assert (page.total, page.offset, page.models) == (n, n - 10, edge.store.model_ids()[-10:])


def test_list_models_claiming_another_device_or_past_the_end(harness: Harness) -> None:
    """A list_models naming another device is refused to its sender (forbidden) and answers
    nobody else; an offset past the end gets an empty page with the total, not an error."""
    harness.edge()
    dev = harness.client("dev1")
    dev.control(tiny_model(1).announce("dev1"))
    dev.inventory()
    victim = harness.client("victim")
    dev.control(ListModels(device="victim"))
    err = dev.error(lambda e: e.code == "forbidden")
    assert "victim" in err.message
    with pytest.raises(AssertionError, match="no such frame"):
        victim.take(lambda h: isinstance(h, ModelList), 0.5)
    dev.control(ListModels(device="dev1", offset=1 << 31))
    page, _ = dev.take(lambda h: isinstance(h, ModelList), 10)
    assert isinstance(page, ModelList) and page.models == [] and page.total == 1


def test_providers_in_use_merge_every_workers_last_load() -> None:
    from edge_agent.stats import EdgeStats

    st = EdgeStats()
    assert st.providers_in_use() == []  # nothing loaded yet
    st.used_providers("w0", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    st.used_providers("w1", ("CPUExecutionProvider",))  # its GPU session could not start
    assert st.providers_in_use() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    st.used_providers("w0", ("CPUExecutionProvider",))  # the last load is what counts
    assert st.providers_in_use() == ["CPUExecutionProvider"]
    copy = st.copy()
    copy.used_providers("w2", ("X",))
    assert st.providers_in_use() == ["CPUExecutionProvider"]  # copies share nothing


def test_an_edge_restarted_on_its_store_reports_what_its_queries_sessions_run_on(
    harness: Harness,
) -> None:
    """Blocks already stored are not warmed: the sessions a query makes on the way are asked
    for their providers once (else the status would never say, on the GPU edge it is for)."""
    model = tiny_model()
    first = harness.edge()
    dev = harness.client()
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    first.stop()
    edge = harness.edge()  # the same store
    dev.control(model.announce(dev.device))
    assert dev.inventory().stored == [0, 1, 2]

    def in_use() -> list[str]:
        return edge.threads.call(lambda: edge.status.status("online").providers_in_use)

    assert in_use() == []  # no session made yet
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    dev.send(harness.topics.edge_query("edge1", dev.device), dev.query_frame(model, "q", x))
    assert dev.result("q").tolist() == (x + 6).tolist()
    wait_until(lambda: in_use() == ["CPUExecutionProvider"], 5, "the providers asked")
