"""The edge's retained status over a real mosquitto: an ``EdgeStatus``, online then offline."""

from __future__ import annotations

import threading

import pytest

from iotoffload.transport.mqtt import Message
from iotoffload.transport.status import EdgeStatus
from tests.edge_agent.conftest import Harness, tiny_model, wait_until

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
        if st.state == "online" and st.blocks == 3:
            seen.set()

    dev.link.subscribe(harness.topics.edge_status("edge1"), on_status)
    dev.control(model.announce(dev.device))
    dev.inventory()
    dev.upload(model)
    assert seen.wait(5)
    st = got[-1]
    assert st.edge == "edge1" and st.models == [model.model_id] and st.broker == edge.broker_url
    assert st.load.in_flight == 0 and st.transfer.blocks_pushed == 0
    edge.stop()
    wait_until(lambda: got[-1].state == "offline", 5, "the offline status")
