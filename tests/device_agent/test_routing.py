"""The device's inbound checks (protocol v2): the sender is the topic's last level; a frame
concerns only its sender's session; control commands only from its operators, only toward edges
its policy allows. Frames are injected as paho's thread or the loop would hand them on."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from iotoffload.model import ModelPackage
from iotoffload.transport.frame import Error, ErrorCode, Inventory, Result, encode_tensor_frame
from iotoffload.transport.link import Message
from tests.device_agent.helpers import inject, inject_message

UNREACHABLE = "mqtt://127.0.0.1:9"  # nothing listens: the agent is never connected


@pytest.fixture
def dev(mobilenet: ModelPackage) -> Iterator[DeviceAgent]:
    d = DeviceAgent(
        mobilenet,
        UNREACHABLE,
        "e1",
        device_id="d1",
        device_ms=[5.0] * mobilenet.num_blocks,
        operators=["ops"],
        allowed_edges=["e1", "e2"],
    )
    yield d
    d.close()


def test_an_inventory_claiming_another_edge_is_dropped(
    dev: DeviceAgent, mobilenet: ModelPackage
) -> None:
    mid = mobilenet.manifest.model_id
    every = list(range(mobilenet.num_blocks))
    inject(dev, Inventory(model_id=mid, known=True, edge="e1", stored=every), sender="e2")
    assert dev.router.refused == 1
    assert dev.loop.call(lambda: dev.session.stored) == frozenset()
    # with no edge field, it concerns the sender's session: e2 has none, e1 is untouched
    inject(dev, Inventory(model_id=mid, known=True, stored=every), sender="e2")
    assert dev.loop.call(lambda: dev.session.stored) == frozenset()
    inject(dev, Inventory(model_id=mid, known=True, stored=every), sender="e1")
    assert dev.loop.call(lambda: dev.session.stored) == frozenset(every)


def test_an_upload_error_from_another_edge_does_not_fail_my_upload(
    dev: DeviceAgent,
) -> None:
    err = Error(code=ErrorCode.REJECTED_BLOCK, message="forged", block=0, chunk=0)
    inject(dev, err, sender="e2")
    assert dev.loop.call(lambda: dict(dev.session._block_failed)) == {}
    inject(dev, err, sender="e1")
    assert 0 in dev.loop.call(lambda: dict(dev.session._block_failed))


def test_a_query_is_answered_only_by_its_edge_and_in_its_shape(
    dev: DeviceAgent, mobilenet: ModelPackage
) -> None:
    answers = dev.queries.pending.answers
    out = mobilenet.manifest.blocks[-1].output
    fut = answers.open("d1-7", "e1", (out.dtype, tuple(out.shape)))
    ok = np.zeros(out.shape, np.float32)

    def result(x: np.ndarray, sender: str) -> None:  # type: ignore[type-arg]
        frame = encode_tensor_frame(Result, x, request_id="d1-7", queue_ms=0, exec_ms=0)
        dev.router.on_inbox_message(Message(dev.topics.device_inbox("d1", sender), frame))

    result(ok, "e2")  # not the edge asked
    result(np.zeros((1, 10), np.float32), "e1")  # the wrong shape
    inject(dev, Error(code=ErrorCode.INTERNAL, message="x", request_id="d1-7"), sender="e2")
    assert not fut.done() and dev.router.refused == 3
    result(ok, "e1")
    got = fut.result(1)
    assert isinstance(got, tuple) and got[0].request_id == "d1-7"


def test_a_frame_without_a_sender_level_is_dropped(dev: DeviceAgent) -> None:
    inv = Inventory(model_id="0" * 64, known=True)
    from iotoffload.transport.frame import encode

    dev.router.on_inbox_message(Message("iotoffload/v2/devices/d1/inbox", encode(inv)))
    dev.router.on_inbox_message(Message("elsewhere/d1/inbox/e1", encode(inv)))
    assert dev.router.refused == 0  # never decoded, never dispatched


def test_control_only_from_an_operator_and_only_toward_allowed_edges(dev: DeviceAgent) -> None:
    prefer = json.dumps({"prefer": "e2"}).encode()
    inject_message(dev, "control", dev.topics.device_control("d1", "mallory"), prefer)
    assert dev.prefer is None
    evil = json.dumps({"prefer": "evil"}).encode()
    inject_message(dev, "control", dev.topics.device_control("d1", "ops"), evil)
    assert dev.prefer is None
    inject_message(dev, "control", dev.topics.device_control("d1", "ops"), prefer)
    assert dev.prefer == "e2"


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,  # json.loads would recurse until RecursionError
        b'{"prefer": "e2", "prefer": "evil"}',  # a key twice: parsers may disagree
        b'{"prefer": "e2", "pad": "' + b"x" * 2000 + b'"}',  # over the size cap
        b"\xff\xfe{}",
    ],
)
def test_hostile_control_payloads_are_ignored(dev: DeviceAgent, payload: bytes) -> None:
    inject_message(dev, "control", dev.topics.device_control("d1", "ops"), payload)
    assert dev.prefer is None
    ok = json.dumps({"prefer": "e2"}).encode()
    inject_message(dev, "control", dev.topics.device_control("d1", "ops"), ok)
    assert dev.prefer == "e2"  # and the device still takes a good one
