from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotoffload.transport.frame import (
    FRAME_VERSION,
    MAGIC,
    Error,
    ErrorCode,
    FrameError,
    PeerFetch,
    Query,
    Result,
    Transfer,
    UploadChunk,
    decode,
    encode,
    encode_tensor_frame,
    tensor_of,
)

MID = "ab" * 32


def _query(x: np.ndarray) -> bytes:
    return encode_tensor_frame(
        Query, x, request_id="r1", device="dev1", model_id=MID, start=3, end=18, deadline_ms=50
    )


def test_tensor_round_trip_is_exact_and_zero_copy() -> None:
    x = np.random.default_rng(0).standard_normal((1, 28, 28, 32)).astype(np.float32)
    payload = _query(x)
    header, body = decode(payload)
    assert isinstance(header, Query) and header.start == 3 and header.end == 18
    y = tensor_of(header, body)
    np.testing.assert_array_equal(x, y)
    assert not y.flags.writeable  # a view of the payload, not a copy
    assert np.shares_memory(y, np.frombuffer(payload, np.uint8))


def test_chunk_round_trip() -> None:
    h = UploadChunk(
        device="d",
        model_id=MID,
        block=2,
        block_sha256="cd" * 32,
        block_bytes=10,
        chunk=0,
        chunks=1,
        chunk_size=10,
    )
    header, body = decode(encode(h, b"0123456789"))
    assert header == h and bytes(body) == b"0123456789"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", "malformed"),
        (b"IOTO\x02", "malformed"),
        (b"NOPE\x01\x00\x00\x00\x02{}", "malformed"),
        (b"IOTO\x07\x00\x00\x00\x02{}", "unsupported_version"),
        (b"IOTO\x02\xff\xff\xff\xff{}", "malformed"),
        (b"IOTO\x02\x00\x00\x00\x05{}", "malformed"),  # header length past the end
        (b"IOTO\x02\x00\x00\x00\x03{x}", "malformed"),
        (b"IOTO\x02\x00\x00\x00\x02[]", "invalid_header"),
        (b'IOTO\x02\x00\x00\x00\x0f{"type":"nope"}', "invalid_header"),
    ],
)
def test_malformed_frames_raise_frame_errors(payload: bytes, code: str) -> None:
    with pytest.raises(FrameError) as e:
        decode(payload)
    assert e.value.code == code


def test_body_size_must_match_the_declared_tensor() -> None:
    x = np.zeros((1, 10), np.float32)
    payload = _query(x)
    with pytest.raises(FrameError) as e:
        decode(payload[:-4])
    assert e.value.code == "size_mismatch" and e.value.request_id == "r1"


def test_oversized_body_is_refused_before_use() -> None:
    payload = encode(Error(code=ErrorCode.INTERNAL, message="y"), b"\0" * 1000)
    with pytest.raises(FrameError) as e:
        decode(payload, max_body=999)
    assert e.value.code == "too_large"


def test_invalid_fields_name_the_field_and_keep_the_request_id() -> None:
    hdr = {
        "type": "query",
        "request_id": "q9",
        "device": "d",
        "model_id": "short",
        "start": 0,
        "end": 1,
        "deadline_ms": 5,
        "tensor": {"dtype": "float32", "shape": [1]},
    }
    raw = json.dumps(hdr).encode()
    with pytest.raises(FrameError) as e:
        decode(MAGIC + struct.pack(">BI", FRAME_VERSION, len(raw)) + raw + b"\0" * 4)
    assert e.value.code == "invalid_header" and "model_id" in str(e.value)
    assert e.value.request_id == "q9"


def test_huge_declared_shape_is_refused_without_allocating() -> None:
    hdr = {
        "type": "result",
        "request_id": "a",
        "queue_ms": 0,
        "exec_ms": 0,
        "tensor": {"dtype": "float32", "shape": [1 << 20, 1 << 20, 1 << 20]},
    }
    raw = json.dumps(hdr).encode()
    with pytest.raises(FrameError) as e:
        decode(MAGIC + struct.pack(">BI", FRAME_VERSION, len(raw)) + raw + b"\0" * 16)
    assert e.value.code == "size_mismatch"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    for payload in (data, MAGIC + bytes([FRAME_VERSION]) + data):
        with contextlib.suppress(FrameError):
            decode(payload)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=4),
    st.sampled_from(["float32", "float16", "int8", "uint8", "int32", "int64"]),
)
def test_any_tensor_round_trips(shape: list[int], dtype: str) -> None:
    x = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    h, body = decode(encode_tensor_frame(Result, x, request_id="r", queue_ms=1.0, exec_ms=2.0))
    np.testing.assert_array_equal(tensor_of(h, body), x)


def test_handoff_frames_round_trip_and_reject_bad_ids() -> None:
    t = Transfer(
        device="d1",
        model_id=MID,
        source_edge="edge-a",
        source_broker="mqtt://127.0.0.1:1883",
        blocks=[3, 4, 5],
    )
    assert decode(encode(t))[0] == t
    f = PeerFetch(peer="edge-b", device="d1", model_id=MID, blocks=[3])
    assert decode(encode(f))[0] == f
    bad = json.loads(t.model_dump_json()) | {"source_edge": "a/b"}  # would be a topic level
    hb = json.dumps(bad).encode()
    with pytest.raises(FrameError) as e:
        decode(MAGIC + struct.pack(">BI", FRAME_VERSION, len(hb)) + hb)
    assert e.value.code == "invalid_header" and e.value.device == "d1"
    empty = json.loads(f.model_dump_json()) | {"blocks": []}
    hb = json.dumps(empty).encode()
    with pytest.raises(FrameError):
        decode(MAGIC + struct.pack(">BI", FRAME_VERSION, len(hb)) + hb)


def test_error_frames_carry_typed_fields_and_known_codes_only() -> None:
    e = Error(code=ErrorCode.INVALID_CHUNK, message="m", block=3, chunk=7, edge="e1")
    h, _ = decode(encode(e))
    assert isinstance(h, Error) and (h.code, h.block, h.chunk, h.request_id) == (
        ErrorCode.INVALID_CHUNK,
        3,
        7,
        None,
    )
    raw = encode(e).replace(b'"invalid_chunk"', b'"made_up_code!"')
    with pytest.raises(FrameError) as bad:
        decode(raw)
    assert bad.value.code == ErrorCode.INVALID_HEADER


def test_a_deeply_nested_header_is_malformed_not_a_crash() -> None:
    hb = b"[" * 65536
    with pytest.raises(FrameError) as e:
        decode(MAGIC + bytes([FRAME_VERSION]) + len(hb).to_bytes(4, "big") + hb)
    assert e.value.code == ErrorCode.MALFORMED


def test_every_protocol_error_code_is_an_error_code() -> None:
    from edge_agent.store import StoreError
    from iotoffload.transport.frame import ProtocolError

    for err in (FrameError(ErrorCode.MALFORMED, "m"), StoreError(ErrorCode.DIGEST_MISMATCH, "d")):
        assert isinstance(err, ProtocolError) and isinstance(err.code, ErrorCode)
        assert Error.of(err, edge="e1").code == err.code


def test_non_finite_floats_are_refused() -> None:
    """A result claiming an infinite queue time would poison the device's estimates."""
    for bad in (b"1e400", b"NaN", b"-Infinity"):
        hb = b'{"type":"result","request_id":"r1","queue_ms":%s,"exec_ms":1.0,' % bad
        hb += b'"tensor":{"dtype":"float32","shape":[1]}}'
        raw = MAGIC + bytes([FRAME_VERSION]) + len(hb).to_bytes(4, "big") + hb + b"\0" * 4
        with pytest.raises(FrameError) as e:
            decode(raw)
        assert e.value.code == ErrorCode.INVALID_HEADER, bad
