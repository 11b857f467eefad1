from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotoffload.model.manifest import TensorSpec
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


# --- issue 13 item 6: any bytes become a typed error -------------------------------------------


def _frame(hb: bytes, body: bytes = b"") -> bytes:
    return MAGIC + bytes([FRAME_VERSION]) + len(hb).to_bytes(4, "big") + hb + body


def _reply_encodes(e: FrameError) -> None:
    """What the edge does with a refused frame: an error frame, which must encode."""
    h, _ = decode(encode(Error.of(e, edge="edge-1")))
    assert isinstance(h, Error) and h.code == e.code


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"", 0),
        (b"1", 0),
        (b"[]", 1),
        (b'{"a":[1,[2]],"b":{}}', 3),
        (b'"[[[{{"', 0),  # brackets inside a string do not nest
        (b'["\\"[", [[]]]', 3),  # an escaped quote does not end the string
        (b'["\\\\", [[]]]', 3),  # an escaped backslash does not escape the quote after it
        (b'["\\\\\\"]]]", []]', 2),  # \\ then \" : the string goes on to the last quote
        (b'["]]]]", [[[]]]]', 4),  # closing brackets inside a string do not un-nest
        (b"[" * 70_000, 70_000),
    ],
)
def test_json_depth_skips_strings_and_escapes(raw: bytes, depth: int) -> None:
    from iotoffload.transport.frame import json_depth

    assert json_depth(raw) == depth


def test_a_deep_header_is_refused_by_the_depth_check_before_the_parser() -> None:
    from iotoffload.transport.frame import MAX_HEADER_DEPTH

    with pytest.raises(FrameError) as e:
        decode(_frame(b"[" * 65_536))
    assert e.value.code == ErrorCode.MALFORMED and "nests 65536 deep" in str(e.value)
    assert not isinstance(e.value.__cause__, RecursionError)  # never reached json.loads
    ok = b"[" * MAX_HEADER_DEPTH + b"]" * MAX_HEADER_DEPTH
    with pytest.raises(FrameError) as e:
        decode(_frame(ok))
    assert e.value.code == ErrorCode.INVALID_HEADER  # parsed: JSON, just not a header
    deep = b"[" * (MAX_HEADER_DEPTH + 1) + b"]" * (MAX_HEADER_DEPTH + 1)
    with pytest.raises(FrameError) as e:
        decode(_frame(deep))
    assert e.value.code == ErrorCode.MALFORMED


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """A real announce whose name is full of brackets still decodes (the slow path runs)."""
    from iotoffload.transport.frame import Announce, BlockInfo

    spec = TensorSpec(name="x", shape=(1, 4))
    a = Announce(
        device="dev1",
        model_id=MID,
        name="[[[[{{{{" * 30,
        blocks=[BlockInfo(onnx_sha256=MID, onnx_bytes=9, input=spec, output=spec)] * 5,
    )
    assert decode(encode(a))[0] == a


def test_an_integer_past_pythons_digit_limit_is_malformed() -> None:
    """json.loads raises a bare ValueError for it: it escaped decode before issue 13."""
    hb = b'{"type":"hello","device":"d1","model_id":' + b"9" * 5000 + b"}"
    with pytest.raises(FrameError) as e:
        decode(_frame(hb))
    assert e.value.code == ErrorCode.MALFORMED


def test_huge_integers_are_refused_in_every_index_and_size_field() -> None:
    h = json.loads(
        UploadChunk(
            device="d1",
            model_id=MID,
            block=2,
            block_sha256="cd" * 32,
            block_bytes=10,
            chunk=0,
            chunks=1,
            chunk_size=10,
        ).model_dump_json()
    )
    for field, bad in [
        ("block", 1024),
        ("chunk", 1 << 16),
        ("block_bytes", 1 << 63),
        ("chunk_size", 10**4000),
    ]:
        hb = json.dumps(h | {field: bad}).encode()
        with pytest.raises(FrameError) as e:
            decode(_frame(hb, b"0123456789"))
        assert e.value.code == ErrorCode.INVALID_HEADER and field in str(e.value), field
    q = json.loads(_query(np.zeros((1, 1), np.float32))[9:-4])
    for field, bad in [("start", 1024), ("end", 1025)]:
        with pytest.raises(FrameError) as e:
            decode(_frame(json.dumps(q | {field: bad}).encode(), b"\0" * 4))
        assert e.value.code == ErrorCode.INVALID_HEADER and e.value.request_id == "r1"


def test_an_announced_tensor_must_fit_a_wire_tensor() -> None:
    from iotoffload.transport.frame import MAX_DIM, BlockInfo

    ok = TensorSpec(name="x", shape=(1, MAX_DIM))
    BlockInfo(onnx_sha256=MID, onnx_bytes=9, input=ok, output=ok)
    for shape in ((1, MAX_DIM + 1), (1,) * 9, (10**300,)):
        bad = TensorSpec(name="y", shape=shape)
        with pytest.raises(ValueError, match="dimensions"):
            BlockInfo(onnx_sha256=MID, onnx_bytes=9, input=ok, output=bad)


@pytest.mark.parametrize(
    "hb",
    [
        # UTF-16 (json.loads would detect and accept it): the header is UTF-8
        json.dumps({"type": "hello", "device": "d1", "model_id": MID}).encode("utf-16"),
        b'{"type":"hello","device":"d1","model_id":"\xed\xa0\x80"}',  # an encoded surrogate
        b"\xef\xbb\xbf{}",  # a byte order mark
        b'{"type":"hello","device":"d1","model_id":"%s","model_id":"x"}' % MID.encode(),
    ],
    ids=["utf16", "encoded-surrogate", "bom", "duplicate-key"],
)
def test_headers_that_are_not_strict_utf8_json_objects_are_malformed(hb: bytes) -> None:
    with pytest.raises(FrameError) as e:
        decode(_frame(hb))
    assert e.value.code == ErrorCode.MALFORMED


@pytest.mark.parametrize(
    "hb",
    [
        b'{"type":"\\ud800"}',  # the validation message quotes the tag
        b'{"type":"hello","\\udfff":1}',  # ... or the extra key
        b'{"type":"hello","device":"d1","model_id":"%s","x\\ud800":1}' % MID.encode(),
        b'{"type":"query","request_id":"\\ud800","device":"d1"}',  # and request_id is echoed
    ],
)
def test_an_error_frame_quoting_a_lone_surrogate_still_encodes(hb: bytes) -> None:
    with pytest.raises(FrameError) as e:
        decode(_frame(hb))
    assert e.value.code == ErrorCode.INVALID_HEADER
    _reply_encodes(e.value)


def test_the_device_of_a_refused_header_must_be_a_whole_id() -> None:
    hb = b'{"type":"hello","device":"d1\\n","model_id":"short"}'
    with pytest.raises(FrameError) as e:
        decode(_frame(hb))
    assert e.value.device is None  # re.match("^...$") would take "d1\n"
    hb = b'{"type":"hello","device":"d1","model_id":"short"}'
    with pytest.raises(FrameError) as e:
        decode(_frame(hb))
    assert e.value.device == "d1"


def test_encoding_a_header_that_cannot_be_utf8_is_a_frame_error() -> None:
    from iotoffload.transport.frame import Announce, BlockInfo

    bad = TensorSpec(name="\ud800", shape=(1, 4))  # a plain str field: pydantic takes it
    a = Announce(
        device="d1",
        model_id=MID,
        blocks=[BlockInfo(onnx_sha256=MID, onnx_bytes=9, input=bad, output=bad)],
    )
    with pytest.raises(FrameError) as e:
        encode(a)
    assert e.value.code == ErrorCode.INVALID_HEADER


def test_a_tensor_name_with_a_lone_surrogate_is_refused_and_a_pair_is_fine() -> None:
    from iotoffload.transport.frame import Announce, BlockInfo

    spec = TensorSpec(name="x", shape=(1, 4))
    a = Announce(
        device="d1",
        model_id=MID,
        blocks=[BlockInfo(onnx_sha256=MID, onnx_bytes=9, input=spec, output=spec)],
    )
    hb = a.model_dump_json().encode().replace(b'"name":"x"', b'"name":"\\ud800"', 1)
    with pytest.raises(FrameError) as e:
        decode(_frame(hb))
    assert e.value.code == ErrorCode.INVALID_HEADER and e.value.device == "d1"
    _reply_encodes(e.value)
    paired = hb.replace(b"\\ud800", b"\\ud83d\\ude00")  # an escaped emoji (json.dumps writes it)
    h, _ = decode(_frame(paired))
    assert isinstance(h, Announce) and h.blocks[0].input.name == "\U0001f600"


def test_an_inventory_without_partials_leaves_the_new_field_out() -> None:
    """Older agents validate headers strictly: a field added within frame version 2 must not
    appear when it says nothing."""
    from iotoffload.transport.frame import Inventory

    mid = "a" * 64
    plain = encode(Inventory(model_id=mid, known=True))
    assert b"partial_chunk_size" not in plain
    with_sizes = Inventory(model_id=mid, known=True, partial={1: [2]}, partial_chunk_size={1: 4096})
    h, _ = decode(encode(with_sizes))
    assert isinstance(h, Inventory) and h.partial_chunk_size == {1: 4096}


def test_an_unencoded_chunk_and_an_inventory_of_unencoded_partials_leave_encodings_out() -> None:
    """Older edges and devices refuse unknown header fields: encoding fields appear only
    when the upload is encoded."""
    from iotoffload.transport.frame import Inventory, UploadChunk

    mid, sha = "a" * 64, "b" * 64
    plain = dict(device="d1", model_id=mid, block=0, block_sha256=sha, block_bytes=100)
    raw = encode(UploadChunk(**plain, chunk=0, chunks=1, chunk_size=100), b"x" * 100)
    assert b"encoding" not in raw and b"stream_bytes" not in raw
    enc = UploadChunk(
        **plain, chunk=0, chunks=1, chunk_size=80, encoding="shuffle4-zlib", stream_bytes=80
    )
    h, body = decode(encode(enc, b"y" * 80))
    assert bytes(body) == b"y" * 80
    assert isinstance(h, UploadChunk) and (h.encoding, h.stream_bytes, h.wire_bytes) == (
        "shuffle4-zlib",
        80,
        80,
    )
    inv = Inventory(model_id=mid, known=True, partial={1: [2]}, partial_chunk_size={1: 4096})
    assert b"partial_encoding" not in encode(inv)
    h, _ = decode(encode(inv.model_copy(update={"partial_encoding": {1: "shuffle2-zlib"}})))
    assert isinstance(h, Inventory) and h.partial_encoding == {1: "shuffle2-zlib"}


def test_a_result_run_alone_leaves_the_batch_size_out() -> None:
    """Older devices refuse unknown header fields: ``batch`` appears only for a batch."""
    from iotoffload.transport.frame import Result, WireTensor

    t = WireTensor(dtype="float32", shape=(1, 2))
    body = np.zeros((1, 2), np.float32).tobytes()
    alone = Result(request_id="r", tensor=t, queue_ms=1.0, exec_ms=2.0)
    assert b'"batch"' not in encode(alone, body)
    h, _ = decode(encode(alone.model_copy(update={"batch": 5}), body))
    assert isinstance(h, Result) and h.batch == 5
    hb = alone.model_dump_json().encode().replace(b'"batch":1', b'"batch":0')
    with pytest.raises(FrameError, match="batch"):
        decode(_frame(hb, body))


def _pixel_query(x: np.ndarray, pixels: dict[str, object] | None) -> bytes:
    hdr = {
        "type": "query", "request_id": "r1", "device": "dev1", "model_id": MID, "start": 0,
        "end": 18, "deadline_ms": 50, "tensor": {"dtype": str(x.dtype), "shape": list(x.shape)},
    }  # fmt: skip
    if pixels is not None:
        hdr["pixels"] = pixels
    return _frame(json.dumps(hdr).encode(), x.tobytes())


def test_a_pixel_query_round_trips_and_a_plain_one_leaves_the_field_out() -> None:
    from iotoffload.transport.frame import Pixels

    px = np.zeros((1, 4, 4, 3), np.uint8)
    p = Pixels(mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0])
    frame = encode_tensor_frame(
        Query, px, request_id="r", device="d", model_id=MID, start=0, end=2, deadline_ms=9,
        pixels=p,
    )  # fmt: skip
    h, body = decode(frame)
    assert isinstance(h, Query) and h.pixels == p and h.pixels.channel_axis == 3
    assert bytes(body) == px.tobytes()
    nchw = Pixels(mean=[0.0] * 3, std=[1.0] * 3, layout="NCHW")
    h, _ = decode(_pixel_query(np.zeros((1, 3, 4, 5), np.uint8), nchw.model_dump()))
    assert isinstance(h, Query) and h.pixels is not None and h.pixels.channel_axis == 1
    assert b'"pixels"' not in _query(np.zeros((1, 2), np.float32))  # older edges refuse it


@pytest.mark.parametrize(
    ("x", "pixels", "why"),
    [
        (np.zeros((1, 4, 4, 3), np.float32), {"mean": [0] * 3, "std": [1] * 3}, "uint8"),
        (np.zeros((4, 4, 3), np.uint8), {"mean": [0] * 3, "std": [1] * 3}, "rank 4"),
        (np.zeros((1, 4, 4, 3), np.uint8), {"mean": [0] * 2, "std": [1] * 2}, "3 channels"),
        (np.zeros((1, 3, 4, 4), np.uint8), {"mean": [0] * 3, "std": [1] * 3}, "4 channels"),
        (np.zeros((1, 4, 4, 3), np.uint8), {"mean": [0] * 3, "std": [1] * 2}, "2 stds"),
        (np.zeros((1, 4, 4, 3), np.uint8), {"mean": [0] * 3, "std": [0, 1, 1]}, "std"),
        (np.zeros((1, 4, 4, 3), np.uint8), {"mean": [1e9, 0, 0], "std": [1] * 3}, "mean"),
        (np.zeros((1, 4, 4, 3), np.uint8), {"mean": [0] * 3, "std": [1] * 3, "x": 1}, "x"),
        (np.zeros((1, 4, 4, 3), np.uint8), {"mean": [0] * 3}, "std"),
        (np.zeros((1, 4, 4, 3), np.uint8), {"mean": [], "std": []}, "mean"),
    ],
)
def test_pixels_that_do_not_fit_their_tensor_are_invalid_headers(
    x: np.ndarray, pixels: dict[str, object], why: str
) -> None:
    with pytest.raises(FrameError, match=why) as e:
        decode(_pixel_query(x, pixels))
    assert e.value.code == ErrorCode.INVALID_HEADER and e.value.request_id == "r1"
