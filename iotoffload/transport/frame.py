"""The wire frame: a short binary prefix, a JSON header validated by pydantic, raw body bytes.

    magic  b"IOTO"         4 bytes
    version                1 byte   (FRAME_VERSION)
    header length          4 bytes  big-endian, at most MAX_HEADER_BYTES
    header                 UTF-8 JSON, one of the Header models (discriminated by "type")
    body                   the rest: tensor bytes (dtype/shape in the header) or a chunk

Decoding trusts nothing: every length is checked against the payload and the caps before any
allocation, and a tensor body is a zero-copy view of the payload. Whatever the bytes, ``decode``
returns a header or raises ``FrameError`` (the fuzz tests hold it to that): the header must be
strict UTF-8, nest at most ``MAX_HEADER_DEPTH`` deep (checked by a linear scan before the
recursive parser sees it), name no key twice and hold no lone UTF-16 surrogate (a header that
passes encodes again); every integer field is bounded (block and
chunk indices by the protocol's own limits, sizes below 2**63), so a value that passes can be
used in arithmetic, numpy and ONNX Runtime calls without overflowing.
"""

from __future__ import annotations

import json
import re
import struct
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeAlias

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticSerializationError

from iotoffload.ids import ID_PATTERN
from iotoffload.model.block_codec import Encoding
from iotoffload.model.manifest import DType, TensorSpec, tensor_nbytes
from iotoffload.model.preprocess import channel_axis
from iotoffload.runtime.base import Array

MAGIC = b"IOTO"
FRAME_VERSION = 2  # protocol v2: identities in the topics (iotoffload.transport.topics)
_PREFIX = struct.Struct(">4sBI")
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
# The deepest valid header nests 4 (announce.blocks[].input.shape[]); json.loads recurses once
# per level, so anything deeper is refused before it runs (65,536 `[` hit the recursion limit).
MAX_HEADER_DEPTH = 16
MAX_BLOCKS = 1024  # blocks in a model's chain: block indices are below it
MAX_CHUNKS = 1 << 16  # chunks in one block upload: chunk indices are below it
MAX_DIM = 1 << 20  # one dimension of a tensor on the wire
MAX_RANK = 8
_MAX_SIZE = (1 << 63) - 1  # byte counts fit an int64 (numpy, struct, ONNX Runtime)
_SHA = r"^[0-9a-f]{64}$"
_ID = ID_PATTERN
_ID_RE = re.compile(ID_PATTERN)

_Block = Annotated[int, Field(ge=0, lt=MAX_BLOCKS)]
_Chunk = Annotated[int, Field(ge=0, lt=MAX_CHUNKS)]
_Size = Annotated[int, Field(ge=1, le=_MAX_SIZE)]


class ErrorCode(StrEnum):
    """Every code an error frame may carry (docs/mqtt-api.md lists what each means)."""

    # the frame itself
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_HEADER = "invalid_header"
    HEADER_TOO_LARGE = "header_too_large"
    TOO_LARGE = "too_large"
    SIZE_MISMATCH = "size_mismatch"
    UNEXPECTED = "unexpected"  # a valid frame of a type this topic does not take
    FORBIDDEN = "forbidden"  # the frame claims another identity than its topic, or is not allowed
    # models and uploads
    INVALID_MODEL = "invalid_model"
    UNKNOWN_MODEL = "unknown_model"
    INVALID_CHUNK = "invalid_chunk"
    DIGEST_MISMATCH = "digest_mismatch"
    BAD_ENCODING = "bad_encoding"  # an encoded upload does not decode to the announced block
    REJECTED_BLOCK = "rejected_block"
    STORE_FAILED = "store_failed"  # the edge could not write the block (disk full, I/O error)
    QUOTA = "quota"  # the device's (or the edge's) store quota is used up
    QUARANTINED = "quarantined"  # the block exceeded its memory or time limit: never run again
    UNSIGNED = "unsigned"  # the edge serves only models signed by a key it trusts
    # queries
    BAD_RANGE = "bad_range"
    BLOCKS_MISSING = "blocks_missing"
    BAD_TENSOR = "bad_tensor"
    DEADLINE_EXPIRED = "deadline_expired"
    BUSY = "busy"  # the edge's query queue is full (for this device or in total): retry_ms
    # edge-to-edge transfer
    TRANSFER_REFUSED = "transfer_refused"
    TRANSFER_FAILED = "transfer_failed"
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """Anything an agent refuses with an error frame: the code and what the frame names."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: str | None = None,
        device: str | None = None,
        block: int | None = None,
        chunk: int | None = None,
        peer: str | None = None,
        retry_ms: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.request_id = request_id
        self.device = device  # who to answer, when the header named a valid device id
        self.block = block
        self.chunk = chunk
        self.peer = peer
        self.retry_ms = retry_ms  # ``busy``: when the edge expects room again


class FrameError(ProtocolError):
    """A payload that is not a valid frame; ``code`` is sent back in the error frame."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        request_id: str | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(code, message, request_id=request_id, device=device)


class _H(BaseModel):
    # a non-finite float (JSON 1e400, NaN) would poison every estimate made from it
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WireTensor(_H):
    dtype: DType
    shape: tuple[Annotated[int, Field(ge=1, le=MAX_DIM)], ...] = Field(
        min_length=1, max_length=MAX_RANK
    )

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class BlockInfo(_H):
    """What an edge needs to know of one block to store and run it."""

    onnx_sha256: str = Field(pattern=_SHA)
    onnx_bytes: _Size
    input: TensorSpec
    output: TensorSpec

    @model_validator(mode="after")
    def _wire_shapes(self) -> BlockInfo:
        # a boundary tensor travels as a query or result body (a WireTensor): a shape no frame
        # can carry is refused here, before the edge sizes buffers from it
        for t in (self.input, self.output):
            if len(t.shape) > MAX_RANK or any(d > MAX_DIM for d in t.shape):
                raise ValueError(
                    f"tensor {t.name[:64]!r}: at most {MAX_RANK} dimensions of at most {MAX_DIM}"
                )
        return self


class Announce(_H):
    """Device → edge: the chain of a model (so the edge can run ranges of it)."""

    type: Literal["announce"] = "announce"
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    name: str = Field(default="", max_length=256)
    blocks: list[BlockInfo] = Field(min_length=1, max_length=MAX_BLOCKS)
    # ed25519 over ``signed_message`` (iotoffload.model.signing), base64; None: unsigned
    signature: str | None = Field(default=None, max_length=128)
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{16,64}$")  # key fingerprint


class Inventory(_H):
    """Edge → device: which blocks of a model are stored and loaded, and partial uploads."""

    type: Literal["inventory"] = "inventory"
    model_id: str = Field(pattern=_SHA)
    known: bool  # the edge has the model's chain (an Announce)
    stored: list[_Block] = Field(default=[], max_length=MAX_BLOCKS)
    loaded: list[_Block] = Field(default=[], max_length=MAX_BLOCKS)
    partial: dict[_Block, list[_Chunk]] = {}  # block -> chunk indices still missing
    # block -> the chunk size those indices count in (the device resumes with it; a device
    # sizes chunks to its link, so the one that resumes may not be the one that started)
    partial_chunk_size: dict[_Block, _Size] = {}
    # block -> the encoding those chunks are of (left out: identity); a device resumes only
    # in the same encoding
    partial_encoding: dict[_Block, Encoding] = {}
    block_ms: dict[_Block, float] = {}  # the edge's unloaded time of each loaded block (profile)
    edge: str | None = Field(default=None, pattern=_ID)  # who answers (a device may use several)
    # what an app needs to query the whole model (from the announce; None while unknown)
    name: str = Field(default="", max_length=256)
    blocks: int | None = Field(default=None, ge=1, le=MAX_BLOCKS)
    input: TensorSpec | None = None
    output: TensorSpec | None = None


class UploadChunk(_H):
    type: Literal["upload_chunk"] = "upload_chunk"
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    block: _Block
    block_sha256: str = Field(pattern=_SHA)
    block_bytes: _Size
    chunk: _Chunk
    chunks: int = Field(ge=1, le=MAX_CHUNKS)
    chunk_size: _Size
    source: str | None = Field(default=None, pattern=_ID)  # a peer edge pushing it (handoff)
    # The chunks are slices of the block's ONNX file encoded losslessly (block_codec) rather
    # than of the file itself; ``stream_bytes`` is the encoded length the chunks count in
    # (never more than ``block_bytes``, the decoded size the digest is checked on).
    encoding: Encoding = "identity"
    stream_bytes: _Size | None = None

    @model_validator(mode="after")
    def _stream(self) -> UploadChunk:
        if (self.encoding == "identity") != (self.stream_bytes is None):
            raise ValueError("stream_bytes goes with an encoding other than identity, and only")
        if self.stream_bytes is not None and self.stream_bytes > self.block_bytes:
            raise ValueError(
                f"stream_bytes {self.stream_bytes} exceeds block_bytes {self.block_bytes}: an "
                "encoding that does not save bytes is sent as identity"
            )
        return self

    @property
    def wire_bytes(self) -> int:
        """The bytes the chunks carry in all (what ``chunks`` and ``chunk_size`` cut)."""
        return self.stream_bytes if self.stream_bytes is not None else self.block_bytes


class UploadAck(_H):
    type: Literal["upload_ack"] = "upload_ack"
    model_id: str = Field(pattern=_SHA)
    block: _Block
    chunk: _Chunk
    block_done: bool  # every chunk arrived and the block passed its digest and screening
    loaded: bool  # a session for the block exists
    block_ms: float | None = None  # the edge's unloaded time for this block, measured at load
    edge: str | None = Field(default=None, pattern=_ID)


_Norm = Annotated[float, Field(ge=-1e6, le=1e6)]


class Pixels(_H):
    """A query's body is uint8 pixels, not block ``start``'s float32 input: the edge makes
    that input as the device's preprocessing does (``normalize_pixels``: per channel, in
    float32, (x - mean) / std), so it is the same tensor, from a quarter of the bytes."""

    mean: list[_Norm] = Field(min_length=1, max_length=64)
    std: list[Annotated[float, Field(ge=1e-6, le=1e6)]] = Field(min_length=1, max_length=64)
    layout: Literal["NHWC", "NCHW"] = "NHWC"

    @property
    def channel_axis(self) -> int:
        return channel_axis(self.layout)


class Query(_H):
    type: Literal["query"] = "query"
    request_id: str = Field(min_length=1, max_length=128)
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    start: _Block
    end: int = Field(ge=1, le=MAX_BLOCKS)
    deadline_ms: float = Field(gt=0, le=600_000)
    tensor: WireTensor
    pixels: Pixels | None = None  # left out: the body is block ``start``'s own input

    @model_validator(mode="after")
    def _pixels_fit(self) -> Query:
        p, t = self.pixels, self.tensor
        if p is None:
            return self
        if t.dtype != "uint8" or len(t.shape) != 4:
            raise ValueError(f"pixels are a uint8 tensor of rank 4, not {t.dtype}{list(t.shape)}")
        if not len(p.mean) == len(p.std) == t.shape[p.channel_axis]:
            raise ValueError(
                f"pixels: {len(p.mean)} means and {len(p.std)} stds for "
                f"{t.shape[p.channel_axis]} channels ({p.layout})"
            )
        return self


class Result(_H):
    type: Literal["result"] = "result"
    request_id: str = Field(min_length=1, max_length=128)
    tensor: WireTensor
    queue_ms: float
    exec_ms: float
    block_ms: list[float] = Field(default=[], max_length=MAX_BLOCKS)
    # how many queries ran together with this one (dynamic batching; exec_ms and block_ms
    # are the whole batch's); left out when 1
    batch: int = Field(default=1, ge=1, le=1024)


class Error(_H):
    """Edge → device: a refusal. ``request_id`` names the query it answers (None for errors
    not tied to a query); ``block``/``chunk`` the upload chunk refused; ``peer`` the other edge
    of an edge-to-edge transfer (the source a new edge could not fetch from, or the peer an old
    edge will not push a block to)."""

    type: Literal["error"] = "error"
    request_id: str | None = Field(default=None, max_length=128)
    code: ErrorCode
    message: str = Field(max_length=4096)
    edge: str | None = Field(default=None, pattern=_ID)
    block: _Block | None = None
    chunk: _Chunk | None = None
    peer: str | None = Field(default=None, pattern=_ID)
    retry_ms: float | None = Field(default=None, ge=0)  # ``busy``: try again after this long

    @classmethod
    def of(cls, e: ProtocolError, edge: str | None = None) -> Error:
        return cls(
            request_id=e.request_id,
            code=e.code,
            message=str(e)[:4096],
            edge=edge,
            block=e.block,
            chunk=e.chunk,
            peer=e.peer,
            retry_ms=e.retry_ms,
        )


class Hello(_H):
    """Device → edge: ask for the inventory of a model (answered with Inventory)."""

    type: Literal["hello"] = "hello"
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)


MODEL_PAGE = 512  # model ids per ModelList frame (512 x 67 bytes stay far below the cap)


class ListModels(_H):
    """Device or app → edge: the models announced to it, ``MODEL_PAGE`` at a time from
    ``offset`` (the retained status lists only the first ``status_max_models``)."""

    type: Literal["list_models"] = "list_models"
    device: str = Field(pattern=_ID)
    offset: int = Field(default=0, ge=0, le=1 << 31)


class ModelList(_H):
    """Edge → device: one page of the model ids announced to it (sorted), and how many
    there are in all."""

    type: Literal["model_list"] = "model_list"
    edge: str | None = Field(default=None, pattern=_ID)
    offset: int = Field(ge=0)
    total: int = Field(ge=0)
    models: list[Annotated[str, Field(pattern=_SHA)]] = Field(default=[], max_length=MODEL_PAGE)


class Transfer(_H):
    """Device → new edge (handoff): fetch these blocks of a model from the old edge over the
    backhaul instead of waiting for the device to upload them again."""

    type: Literal["transfer"] = "transfer"
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    source_edge: str = Field(pattern=_ID)
    source_broker: str = Field(min_length=1, max_length=256)
    blocks: list[_Block] = Field(min_length=1, max_length=MAX_BLOCKS)


class PeerFetch(_H):
    """New edge → old edge (on the old edge's broker): push these blocks, chunked, to my upload
    topic on your broker, in the device's name. Only blocks whose digest still verifies go."""

    type: Literal["peer_fetch"] = "peer_fetch"
    peer: str = Field(pattern=_ID)
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    blocks: list[_Block] = Field(min_length=1, max_length=MAX_BLOCKS)


Header: TypeAlias = (
    Announce
    | Inventory
    | UploadChunk
    | UploadAck
    | Query
    | Result
    | Error
    | Hello
    | Transfer
    | PeerFetch
    | ListModels
    | ModelList
)
_HEADER: TypeAdapter[Header] = TypeAdapter(Annotated[Header, Field(discriminator="type")])


# fields added within frame version 2 (see ``encode``)
_LATE_FIELDS: dict[type[_H], tuple[str, ...]] = {
    Inventory: ("partial_chunk_size", "partial_encoding"),
    UploadChunk: ("encoding", "stream_bytes"),
    Result: ("batch",),
    Query: ("pixels",),
}


def encode(header: _H, body: bytes | bytearray | memoryview | Array = b"") -> bytes:
    if isinstance(body, np.ndarray):
        body = np.ascontiguousarray(body).data
    # a field added within frame version 2 is left out at its default: older agents validate
    # headers strictly and would refuse every frame that carried it
    late = _LATE_FIELDS.get(type(header), ())
    exclude = {f for f in late if getattr(header, f) == type(header).model_fields[f].default}
    try:
        hb = header.model_dump_json(exclude=exclude or None).encode()
    except PydanticSerializationError as e:  # e.g. a str with a lone surrogate, made by code
        raise FrameError(ErrorCode.INVALID_HEADER, _clean(f"header not encodable: {e}")) from e
    if len(hb) > MAX_HEADER_BYTES:
        raise FrameError(ErrorCode.HEADER_TOO_LARGE, f"header of {len(hb)} bytes")
    return b"".join((_PREFIX.pack(MAGIC, FRAME_VERSION, len(hb)), hb, body))


def encode_tensor_frame(header_cls: type[Query] | type[Result], x: Array, **fields: Any) -> bytes:
    tensor = WireTensor(dtype=str(x.dtype), shape=tuple(x.shape))  # type: ignore[arg-type]
    return encode(header_cls(tensor=tensor, **fields), x)


# JSON text: the bytes that nest ([ { +1, ] } -1), and every byte but those and the quote
_NEST = np.zeros(256, np.int8)
_NEST[[ord("["), ord("{")]] = 1
_NEST[[ord("]"), ord("}")]] = -1
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')


def json_depth(raw: bytes) -> int:
    """How deep the JSON text ``raw`` nests arrays and objects, found without parsing it: a
    linear scan (numpy, no recursion) that skips string contents. Exact for valid JSON; for
    invalid JSON, exact up to the first error, which is where a parser stops."""
    # Drop escaped backslashes, then escaped quotes: every quote left opens or closes a string.
    # (Outside strings a backslash is already a JSON error, where a parser stops.)
    s = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    a = np.frombuffer(s, np.uint8)
    # after an odd number of quotes we are inside a string, whose brackets do not nest
    outside = np.bitwise_and(np.cumsum(a == ord('"'), dtype=np.int32), 1, dtype=np.int32) ^ 1
    return int(np.cumsum(_NEST[a] * outside, dtype=np.int32).max(initial=0))


def _clean(text: str, limit: int = 512) -> str:
    """``text`` cut to ``limit`` and encodable as UTF-8: an error frame quoting a lone surrogate
    (a JSON escape such as "\\ud800") could not be sent. pydantic already replaces those in what
    it quotes; this holds for every message decode builds, whatever quotes it."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {_clean(key, 64)!r} appears twice")
            seen.add(key)
    return obj


_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)
# A JSON escape of a UTF-16 surrogate (paired or not, or text that only looks like one). Strict
# UTF-8 bytes cannot hold a lone surrogate, but "\\ud800" can; pydantic refuses it in a str
# field with a constraint but passes it through a plain ``str`` (a TensorSpec's name), and the
# header could then not be encoded again: stored, echoed or logged, it would raise.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes, *, max_depth: int = MAX_HEADER_DEPTH) -> Any:
    """``raw`` as JSON, or FrameError(MALFORMED) unless it is strict UTF-8, nests at most
    ``max_depth`` deep and names no key of an object twice (two parsers could read a duplicated
    key differently). Raises nothing else, whatever the bytes."""
    # counting brackets is nearly free and bounds the depth: the scan runs only past the limit
    if raw.count(b"[") + raw.count(b"{") > max_depth and (depth := json_depth(raw)) > max_depth:
        raise FrameError(ErrorCode.MALFORMED, f"JSON nests {depth} deep, more than {max_depth}")
    try:
        return _JSON.decode(raw.decode("utf-8"))
    # ValueError: JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit, a
    # duplicated key. RecursionError cannot happen below the depth limit; kept as a backstop.
    except (ValueError, RecursionError) as e:
        raise FrameError(ErrorCode.MALFORMED, f"not JSON: {_clean(str(e))}") from e


def _ids(obj: object) -> tuple[str | None, str | None]:
    """(request_id, device) of a header that failed validation, when present and well-formed:
    so the sender still gets an error frame that names its request."""
    if not isinstance(obj, dict):
        return None, None
    rid, dev = obj.get("request_id"), obj.get("device")
    if not isinstance(rid, str) or not 1 <= len(rid) <= 128 or _clean(rid) != rid:  # UTF-8
        rid = None
    # fullmatch: ``$`` in ID_PATTERN also matches before a final newline
    if not isinstance(dev, str) or _ID_RE.fullmatch(dev) is None:
        dev = None
    return rid, dev


def _peek_ids(mv: memoryview, hlen: int) -> tuple[str | None, str | None]:
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(mv):
        return None, None
    try:
        return _ids(parse_json(bytes(mv[_PREFIX.size : _PREFIX.size + hlen])))
    except FrameError:
        return None, None


def decode(
    payload: bytes | bytearray | memoryview, *, max_body: int = MAX_BODY_BYTES
) -> tuple[Header, memoryview]:
    """(header model, body view). Raises FrameError with a code for anything malformed, and
    nothing else for any bytes."""
    mv = memoryview(payload)
    if len(mv) < _PREFIX.size:
        raise FrameError(
            ErrorCode.MALFORMED, f"frame of {len(mv)} bytes is shorter than its prefix"
        )
    magic, version, hlen = _PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise FrameError(ErrorCode.MALFORMED, "not an iotoffload frame (bad magic)")
    if version != FRAME_VERSION:
        rid, dev = _peek_ids(mv, hlen)  # so the sender still gets an error frame
        raise FrameError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"frame version {version}; this agent speaks {FRAME_VERSION}",
            rid,
            dev,
        )
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(mv):
        raise FrameError(ErrorCode.MALFORMED, f"header length {hlen} exceeds the frame or the cap")
    body = mv[_PREFIX.size + hlen :]
    obj = parse_json(bytes(mv[_PREFIX.size : _PREFIX.size + hlen]))
    try:
        header = _HEADER.validate_python(obj)
    except ValidationError as e:
        first = e.errors(include_url=False, include_context=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FrameError(
            ErrorCode.INVALID_HEADER, _clean(f"{where}: {first['msg']}"), *_ids(obj)
        ) from e
    if _SURROGATE_ESCAPE.search(mv, _PREFIX.size, _PREFIX.size + hlen) is not None:
        try:  # rare (our encoder writes UTF-8, not escapes): the exact check
            header.model_dump_json()
        except PydanticSerializationError as e:
            raise FrameError(
                ErrorCode.INVALID_HEADER, "a string holds a lone UTF-16 surrogate", *_who(header)
            ) from e
    if len(body) > max_body:
        raise FrameError(
            ErrorCode.TOO_LARGE, f"body of {len(body)} bytes exceeds {max_body}", *_who(header)
        )
    if isinstance(header, Query | Result) and header.tensor.nbytes != len(body):
        t = header.tensor
        raise FrameError(
            ErrorCode.SIZE_MISMATCH,
            f"tensor {t.dtype}{list(t.shape)} needs {t.nbytes} bytes, body has {len(body)}",
            *_who(header),
        )
    return header, body


def _who(header: Header) -> tuple[str | None, str | None]:
    """(request_id, device) of a validated header, for the error frame refusing it (only on
    that path: a missing attribute costs pydantic an exception)."""
    return getattr(header, "request_id", None), getattr(header, "device", None)


def tensor_of(header: Query | Result, body: memoryview) -> Array:
    """The body as an array: a read-only, zero-copy view of the payload."""
    t = header.tensor
    return np.frombuffer(body, dtype=np.dtype(t.dtype)).reshape(t.shape)
