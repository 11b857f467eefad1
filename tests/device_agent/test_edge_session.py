"""The upload's flow control, with a fake link: at most ``chunks_in_flight`` chunks unacked,
and no new chunk while a query is in flight to the same edge."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from device_agent.edge_session import EdgeSession
from iotoffload.loop import AgentLoop
from iotoffload.model import ModelPackage
from iotoffload.planning import PlanningInputs, chain_profile
from iotoffload.transport.frame import UploadAck, UploadChunk, decode
from iotoffload.transport.link import Handler, Link
from iotoffload.transport.mqtt import MqttLink
from iotoffload.transport.topics import Topics


class FakeLink:
    """A ``Link`` that records upload chunks instead of sending them."""

    def __init__(self) -> None:
        self.chunks: list[UploadChunk] = []
        self.on_reconnect: list[Callable[[], None]] = []

    def connect(self, timeout: float = 10.0) -> None:
        pass

    def wait_connected(self, timeout: float) -> bool:
        return True

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    connected = True

    def publish(self, _topic: str, payload: bytes, **_: Any) -> None:
        h, _ = decode(payload)
        if isinstance(h, UploadChunk):
            self.chunks.append(h)


def _session(pkg: ModelPackage, link: FakeLink) -> EdgeSession:
    prof = chain_profile(pkg, [1.0] * pkg.num_blocks)
    return EdgeSession(
        "e1",
        "mqtt://127.0.0.1:1",
        link,
        pkg=pkg,
        device_id="d1",
        topics=Topics(),
        inputs=PlanningInputs(prof),
        chunk_size=1024,
        chunks_in_flight=3,
    )


def _settle(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)


@pytest.fixture
def loop() -> Iterator[AgentLoop]:
    lp = AgentLoop("test-device")
    yield lp
    lp.close()


def test_unacked_chunks_are_bounded_and_queries_go_first(
    mobilenet: ModelPackage, loop: AgentLoop
) -> None:
    link = FakeLink()
    s = _session(mobilenet, link)
    data = bytes(10 * 1024)  # 10 chunks of block 0
    t = loop.spawn(s._send_block(0, data, None, None))  # on the loop, as in the agent
    _settle(lambda: len(link.chunks) == 3)
    time.sleep(0.2)
    assert len(link.chunks) == 3  # the window is full: nothing more without an ack

    def ack(c: int) -> None:  # the frame handler runs on the loop, as in the agent
        loop.call(
            lambda: s.on_ack(
                UploadAck(
                    model_id=mobilenet.manifest.model_id,
                    block=0,
                    chunk=c,
                    block_done=False,
                    loaded=False,
                )
            )
        )

    before = s.inputs.estimates.bandwidth_Bps
    loop.call(s.query_started)  # a query to this edge is in flight: the upload yields
    ack(0)
    time.sleep(0.2)
    assert len(link.chunks) == 3
    loop.call(s.query_done)
    _settle(lambda: len(link.chunks) == 4)
    assert [c.chunk for c in link.chunks] == [0, 1, 2, 3]
    acked = {0}
    end = time.monotonic() + 5
    while not t.done() and time.monotonic() < end:  # ack what was sent, as an edge would
        for c in [x.chunk for x in link.chunks if x.chunk not in acked]:
            ack(c)
            acked.add(c)
        time.sleep(0.01)
    assert t.result(1) and [c.chunk for c in link.chunks] == list(range(10))
    # acks about 10 ms apart for 1 KiB chunks: the estimate falls toward ~100 KB/s
    assert s.inputs.estimates.bandwidth_Bps < 0.9 * before


def test_real_and_fake_links_implement_the_link_protocol() -> None:
    assert isinstance(FakeLink(), Link)
    real = MqttLink("mqtt://127.0.0.1:9", "never-connected")
    assert isinstance(real, Link)
