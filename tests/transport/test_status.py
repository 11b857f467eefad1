"""The retained status: one model, written by the edge, read by devices and tools."""

from __future__ import annotations

import json

from iotoffload.transport.status import MAX_STATUS_BYTES, EdgeLoad, EdgeStatus


def test_round_trip_and_unknown_fields_ignored() -> None:
    st = EdgeStatus(
        state="online",
        edge="e1",
        broker="mqtt://127.0.0.1:1883",
        load=EdgeLoad(queue=2, queue_ms=3.5),
    )
    back = EdgeStatus.parse(st.to_json())
    assert back == st
    newer = json.loads(st.to_json())
    newer["gpu"] = {"util": 0.5}  # a field from a newer edge
    assert EdgeStatus.parse(json.dumps(newer)) == st


def test_junk_and_malformed_statuses_are_refused() -> None:
    for junk in (
        b"not json",
        b"[]",
        b'{"state": "online"}',  # no edge
        b'{"state": "maybe", "edge": "e1"}',
        b'{"state": "online", "edge": "bad/id"}',
        b'{"state": "online", "edge": "e1", "load": {"queue": -1}}',
        b"[" * 100_000,
        b'{"state": "online", "edge": "e1", "load": {"queue_ms": 1e400}}',  # inf
        b'{"state": "online", "edge": "e1", "load": {"exec_ms": NaN}}',
        json.dumps({"state": "online", "edge": "e1", "pad": "x" * MAX_STATUS_BYTES}).encode(),
    ):
        assert EdgeStatus.parse(junk) is None
