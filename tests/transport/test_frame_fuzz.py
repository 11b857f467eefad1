"""Fuzzing the frame codec (issue 13 item 6): whatever the bytes, ``decode`` returns a header or
raises ``FrameError``, and what an agent does next works too: the error frame answering a
refusal encodes, a header that passed re-encodes to itself, a tensor body views as an array.

Inputs: random bytes; valid frames of every header type mutated at the byte level (flips,
inserts, deletes, a wrong header length or version, a cut or grown body) and at the JSON
level (a value replaced by a huge number, a non-finite float, a lone surrogate, a wrong type,
deep nesting; keys dropped, added or duplicated); deep nesting alone. The retained status a
device reads (``EdgeStatus.parse``) gets the same treatment.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotoffload.model.manifest import TensorSpec
from iotoffload.transport.frame import (
    FRAME_VERSION,
    MAGIC,
    MAX_HEADER_DEPTH,
    Announce,
    BlockInfo,
    Error,
    ErrorCode,
    FrameError,
    Hello,
    Inventory,
    ListModels,
    ModelList,
    PeerFetch,
    Query,
    Result,
    Transfer,
    UploadAck,
    UploadChunk,
    decode,
    encode,
    encode_tensor_frame,
    json_depth,
    parse_json,
    tensor_of,
)
from iotoffload.transport.status import EdgeLoad, EdgeStatus

MID = "ab" * 32
SHA = "cd" * 32
_SPEC = TensorSpec(name="x", shape=(1, 8, 8, 3))
_OUT = TensorSpec(name="y", shape=(1, 10))


def _valid_frames() -> list[bytes]:
    """One frame of every header type, with every optional field set."""
    block = BlockInfo(onnx_sha256=SHA, onnx_bytes=1234, input=_SPEC, output=_OUT)
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    frames = [
        encode(
            Announce(
                device="dev-1",
                model_id=MID,
                name="net [v2]",
                blocks=[block, block, block],
                signature="c2ln" * 20,
                signer="0123456789abcdef",
            )
        ),
        encode(
            Inventory(
                model_id=MID,
                known=True,
                stored=[0, 1],
                loaded=[0],
                partial={2: [3, 4]},
                block_ms={0: 1.5},
                edge="edge-1",
                name="net",
                blocks=3,
                input=_SPEC,
                output=_OUT,
            )
        ),
        encode(
            UploadChunk(
                device="dev-1",
                model_id=MID,
                block=2,
                block_sha256=SHA,
                block_bytes=10,
                chunk=0,
                chunks=1,
                chunk_size=10,
                source="edge-0",
            ),
            b"0123456789",
        ),
        encode(
            UploadAck(
                model_id=MID,
                block=2,
                chunk=0,
                block_done=True,
                loaded=True,
                block_ms=3.0,
                edge="edge-1",
            )
        ),
        encode_tensor_frame(
            Query,
            x,
            request_id="q-1",
            device="dev-1",
            model_id=MID,
            start=1,
            end=3,
            deadline_ms=50.0,
        ),
        encode_tensor_frame(
            Result,
            x.astype(np.int8),
            request_id="q-1",
            queue_ms=0.5,
            exec_ms=1.0,
            block_ms=[0.4, 0.6],
        ),
        encode(
            Error(
                request_id="q-1",
                code=ErrorCode.BUSY,
                message="queue full",
                edge="edge-1",
                block=1,
                chunk=2,
                peer="edge-2",
                retry_ms=20.0,
            )
        ),
        encode(Hello(device="dev-1", model_id=MID)),
        encode(
            Transfer(
                device="dev-1",
                model_id=MID,
                source_edge="edge-0",
                source_broker="mqtt://127.0.0.1:1883",
                blocks=[1, 2],
            )
        ),
        encode(PeerFetch(peer="edge-1", device="dev-1", model_id=MID, blocks=[1])),
        encode(ListModels(device="dev-1", offset=512)),
        encode(ModelList(edge="edge-1", offset=0, total=2, models=[MID, MID])),
    ]
    assert {decode(f)[0].type for f in frames} == {
        "announce",
        "inventory",
        "upload_chunk",
        "upload_ack",
        "query",
        "result",
        "error",
        "hello",
        "transfer",
        "peer_fetch",
        "list_models",
        "model_list",
    }
    return frames


FRAMES = _valid_frames()
TYPES = sorted({decode(f)[0].type for f in FRAMES})


def _split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    hlen = int.from_bytes(frame[5:9], "big")
    return json.loads(frame[9 : 9 + hlen]), frame[9 + hlen :]


def _frame(hb: bytes, body: bytes = b"", *, version: int = FRAME_VERSION) -> bytes:
    return MAGIC + bytes([version]) + len(hb).to_bytes(4, "big") + hb + body


def check(payload: bytes) -> None:
    """The codec's contract for one payload; any other exception fails the test."""
    try:
        header, body = decode(payload)
    except FrameError as e:
        assert isinstance(e.code, ErrorCode)
        # the depth check, not the parser's recursion limit, stops deep headers
        assert not isinstance(e.__cause__, RecursionError), e
        # what the edge sends back: an error frame naming the request, if any
        reply, _ = decode(encode(Error.of(e, edge="edge-1")))
        assert isinstance(reply, Error) and reply.code == e.code
        assert reply.request_id == e.request_id
        return
    if isinstance(header, Query | Result):
        assert tensor_of(header, body).nbytes == len(body)
    try:
        again = encode(header, body)
    except FrameError as e:  # e.g. 1e5 floats re-encode longer (100000.0) past the cap
        assert e.code == ErrorCode.HEADER_TOO_LARGE
        return
    assert decode(again)[0] == header


# --- random bytes -------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 255))
def test_random_bytes_after_any_prefix(data: bytes, version: int) -> None:
    check(data)
    check(MAGIC + bytes([version]) + data)
    check(_frame(data, version=version))  # a header of random bytes, its length right
    check(_frame(data))


# --- byte-level mutations of valid frames ---------------------------------------------------------

_OPS = st.sampled_from(
    ["flip", "set", "insert", "delete", "length", "version", "cut", "grow", "body"]
)


@st.composite
def byte_mutants(draw: st.DrawFn) -> bytes:
    f = bytearray(draw(st.sampled_from(FRAMES)))
    for op in draw(st.lists(_OPS, min_size=1, max_size=6)):
        at = draw(st.integers(0, max(0, len(f) - 1)))
        if op == "flip" and f:
            f[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and f:
            f[at] = draw(st.integers(0, 255))
        elif op == "insert":
            f[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del f[at : at + draw(st.integers(1, 16))]
        elif op == "length" and len(f) >= 9:  # the header length lies
            hlen = int.from_bytes(f[5:9], "big")
            new = draw(st.one_of(st.integers(0, 2**32 - 1), st.integers(hlen - 8, hlen + 8)))
            f[5:9] = max(0, min(new, 2**32 - 1)).to_bytes(4, "big")
        elif op == "version" and len(f) >= 5:
            f[4] = draw(st.integers(0, 255))
        elif op == "cut":
            del f[at:]
        elif op == "grow":
            f += draw(st.binary(min_size=1, max_size=64))
        elif op == "body" and len(f) >= 9:  # the header intact, the body a byte short or long
            end = 9 + int.from_bytes(f[5:9], "big")
            if end < len(f) and draw(st.booleans()):
                del f[-1]
            else:
                f.append(0)
    return bytes(f)


@settings(max_examples=1500, deadline=None)
@given(byte_mutants())
def test_byte_mutations_of_every_header_type(payload: bytes) -> None:
    check(payload)


# --- JSON-level mutations -----------------------------------------------------------------------

# Raw JSON text spliced in where a value was: things json.dumps will not write.
_RAW_VALUES = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),  # past Python's 4300-digit limit, or not
    st.integers(1, 400).map(lambda n: "-1" + "0" * n),
    st.sampled_from(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e-400", "-0", "0.0"]),
    st.sampled_from(['"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', '"\\x"', '"\\u12"']),
    st.integers(0, 2000).map(lambda n: "[" * n + "]" * n),
    st.integers(0, 2000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(0, 2000).map(lambda n: "[" * n),  # never closed
    st.integers(1, 3000).map(lambda n: '"' + "[" * n + '"'),  # only looks deep
)
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)


def _slots(obj: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in ``obj``, found without recursion."""
    out: list[tuple[Any, Any]] = []
    todo = [obj]
    while todo:
        c = todo.pop()
        keys = list(c) if isinstance(c, dict) else range(len(c)) if isinstance(c, list) else []
        for k in keys:
            out.append((c, k))
            todo.append(c[k])
    return out


@st.composite
def json_mutants(draw: st.DrawFn) -> bytes:
    obj, body = _split(draw(st.sampled_from(FRAMES)))
    raws: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(obj)
        if not slots:  # every key dropped
            break
        op = draw(st.sampled_from(["value", "raw", "drop", "add", "type"]))
        c, k = draw(st.sampled_from(slots))
        if op == "value":
            c[k] = draw(_JSON_VALUES)
        elif op == "raw":  # a placeholder, replaced by raw text once serialised
            c[k] = f"@@RAW{len(raws)}@@"
            raws.append(draw(_RAW_VALUES))
        elif op == "drop" and isinstance(c, dict):
            del c[k]
        elif op == "add" and isinstance(c, dict):
            c[draw(st.text(max_size=12))] = draw(_JSON_VALUES)
        elif op == "type":
            obj["type"] = draw(st.sampled_from(TYPES))  # another type's fields
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    if draw(st.booleans()) and text.startswith("{") and len(obj) > 0:  # a key twice
        key = draw(st.sampled_from(sorted(obj) if isinstance(obj, dict) else [""]))
        text = "{" + json.dumps(key) + ":" + json.dumps(draw(_JSON_VALUES)) + "," + text[1:]
    hb = text.encode("utf-8", "surrogatepass")  # a lone surrogate, encoded: not UTF-8
    body = draw(st.sampled_from([body, body[:-1], body + b"\0", b"", b"\0" * 4]))
    return _frame(hb, body)


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(json_mutants())
def test_json_mutations_of_every_header_type(payload: bytes) -> None:
    check(payload)


# --- nesting ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 70_000),
    st.sampled_from(["[", '{"a":', '["a",', "[{}", '{"type":']),
    st.booleans(),
    st.sampled_from([b"", b'{"type":"hello","device":"dev-1","model_id":', b'["\\"",']),
)
def test_deep_nesting_anywhere(n: int, opener: str, closed: bool, before: bytes) -> None:
    closer = {"[": "]", '{"a":': "}", '["a",': "]", "[{}": "]", '{"type":': "}"}[opener]
    text = (opener * n + ("1" + closer * n if closed else "")).encode()
    hb = before + text + (b"}" if before.startswith(b"{") else b"]" if before else b"")
    check(_frame(hb))
    if n > MAX_HEADER_DEPTH and len(hb) <= 65_536:
        with pytest.raises(FrameError) as e:
            decode(_frame(hb))
        assert e.value.code == ErrorCode.MALFORMED


def _reference_depth(raw: bytes) -> int:
    """A plain scanner, byte by byte: JSON strings and their escapes, nesting outside them."""
    depth = deepest = 0
    in_string = escaped = False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == ord("\\"):
                escaped = True
            elif c == ord('"'):
                in_string = False
        elif c == ord('"'):
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


_TRICKY = st.text(st.sampled_from('[]{}"\\/ab\n\u00e9\U0001f600'), max_size=12)
_DOCS = st.recursive(
    st.none() | st.integers() | _TRICKY,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_TRICKY, kids, max_size=4),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(_DOCS, st.booleans())
def test_json_depth_is_exact_on_valid_json(doc: Any, ascii_only: bool) -> None:
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert json_depth(raw) == _reference_depth(raw)


@settings(max_examples=800, deadline=None)
@given(st.text(st.sampled_from('[]{}"\\ :,1an'), max_size=80))
def test_json_depth_bounds_what_a_parser_enters_before_its_first_error(text: str) -> None:
    """On any text, json.loads stops at its first error: up to there, the nesting it entered
    is at most what json_depth says (so the check before it is never fooled)."""
    raw = text.encode()
    try:
        json.loads(raw)
        end = len(raw)
    except json.JSONDecodeError as e:
        end = e.pos
    assert _reference_depth(raw[:end]) <= json_depth(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_json_raises_only_frame_errors(raw: bytes) -> None:
    try:
        parse_json(raw)
    except FrameError as e:
        assert e.code == ErrorCode.MALFORMED


# --- the retained status a device parses ----------------------------------------------------------

_STATUS = EdgeStatus(
    state="online",
    edge="edge-1",
    version="0.1.0",
    broker="mqtt://127.0.0.1:1883",
    load=EdgeLoad(queue=1, in_flight=1, queue_ms=2.0, exec_ms=3.0),
    models=[MID],
    blocks=3,
).to_json()


@st.composite
def status_mutants(draw: st.DrawFn) -> bytes:
    obj = json.loads(_STATUS)
    raws: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        c, k = draw(st.sampled_from(_slots(obj)))
        if draw(st.booleans()):
            c[k] = draw(_JSON_VALUES)
        else:
            c[k] = f"@@RAW{len(raws)}@@"
            raws.append(draw(_RAW_VALUES))
    text = json.dumps(obj, allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(status_mutants(), st.binary(max_size=300)))
def test_edge_status_parse_never_raises(payload: bytes) -> None:
    st_ = EdgeStatus.parse(payload)
    if st_ is not None:
        assert EdgeStatus.parse(st_.to_json()) == st_


def test_the_mutators_reach_every_outcome() -> None:
    """The fuzzers are worth their time only if they get past the prefix and the parser: a
    fixed sample of mutants must produce both accepted headers and every refusal stage."""
    codes: set[ErrorCode | str] = set()

    @settings(max_examples=600, deadline=None, database=None, derandomize=True)
    @given(st.one_of(byte_mutants(), json_mutants()))
    def sample(payload: bytes) -> None:
        try:
            decode(payload)
            codes.add("ok")
        except FrameError as e:
            codes.add(e.code)

    sample()
    want = {
        "ok",
        ErrorCode.MALFORMED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.INVALID_HEADER,
        ErrorCode.SIZE_MISMATCH,
    }
    assert want <= codes, want - codes


def test_a_lone_surrogate_in_any_string_of_any_header() -> None:
    """Exhaustive, not sampled: every string value of every header type, in turn, becomes a
    JSON-escaped lone surrogate (a plain ``str`` field such as a tensor's name lets it through
    validation, and the header could then not be encoded: the edge failed storing it)."""
    tried = 0
    for frame in FRAMES:
        obj, body = _split(frame)
        for c, k in _slots(obj):
            if not isinstance(c[k], str):
                continue
            was, c[k] = c[k], "\ud800"
            check(_frame(json.dumps(obj).encode(), body))  # ensure_ascii: written \\ud800
            c[k] = was
            tried += 1
    assert tried > 40
