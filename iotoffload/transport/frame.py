"""The wire frame: a short binary prefix, a JSON header validated by pydantic, raw body bytes.

    magic  b"IOTO"         4 bytes
    version                1 byte   (FRAME_VERSION)
    header length          4 bytes  big-endian, at most MAX_HEADER_BYTES
    header                 UTF-8 JSON, one of the Header models (discriminated by "type")
    body                   the rest: tensor bytes (dtype/shape in the header) or a chunk

Decoding trusts nothing: every length is checked against the payload and the caps before any
allocation, and a tensor body is a zero-copy view of the payload.
"""

from __future__ import annotations

import json
import struct
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeAlias

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from iotoffload.ids import ID_PATTERN, is_id
from iotoffload.model.manifest import DType, TensorSpec, tensor_nbytes
from iotoffload.runtime.base import Array

MAGIC = b"IOTO"
FRAME_VERSION = 2  # protocol v2: identities in the topics (iotoffload.transport.topics)
_PREFIX = struct.Struct(">4sBI")
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
_SHA = r"^[0-9a-f]{64}$"
_ID = ID_PATTERN


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
    shape: tuple[Annotated[int, Field(ge=1, le=1 << 20)], ...] = Field(min_length=1, max_length=8)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class BlockInfo(_H):
    """What an edge needs to know of one block to store and run it."""

    onnx_sha256: str = Field(pattern=_SHA)
    onnx_bytes: int = Field(ge=1)
    input: TensorSpec
    output: TensorSpec


class Announce(_H):
    """Device → edge: the chain of a model (so the edge can run ranges of it)."""

    type: Literal["announce"] = "announce"
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    name: str = Field(default="", max_length=256)
    blocks: list[BlockInfo] = Field(min_length=1, max_length=1024)
    # ed25519 over ``signed_message`` (iotoffload.model.signing), base64; None: unsigned
    signature: str | None = Field(default=None, max_length=128)
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{16,64}$")  # key fingerprint


class Inventory(_H):
    """Edge → device: which blocks of a model are stored and loaded, and partial uploads."""

    type: Literal["inventory"] = "inventory"
    model_id: str = Field(pattern=_SHA)
    known: bool  # the edge has the model's chain (an Announce)
    stored: list[int] = []
    loaded: list[int] = []
    partial: dict[int, list[int]] = {}  # block -> chunk indices still missing
    block_ms: dict[int, float] = {}  # the edge's unloaded time of each loaded block (profile)
    edge: str | None = Field(default=None, pattern=_ID)  # who answers (a device may use several)
    # what an app needs to query the whole model (from the announce; None while unknown)
    name: str = Field(default="", max_length=256)
    blocks: int | None = Field(default=None, ge=1, le=1024)
    input: TensorSpec | None = None
    output: TensorSpec | None = None


class UploadChunk(_H):
    type: Literal["upload_chunk"] = "upload_chunk"
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    block: int = Field(ge=0)
    block_sha256: str = Field(pattern=_SHA)
    block_bytes: int = Field(ge=1)
    chunk: int = Field(ge=0)
    chunks: int = Field(ge=1, le=1 << 16)
    chunk_size: int = Field(ge=1)
    source: str | None = Field(default=None, pattern=_ID)  # a peer edge pushing it (handoff)


class UploadAck(_H):
    type: Literal["upload_ack"] = "upload_ack"
    model_id: str = Field(pattern=_SHA)
    block: int
    chunk: int
    block_done: bool  # every chunk arrived and the block passed its digest and screening
    loaded: bool  # a session for the block exists
    block_ms: float | None = None  # the edge's unloaded time for this block, measured at load
    edge: str | None = Field(default=None, pattern=_ID)


class Query(_H):
    type: Literal["query"] = "query"
    request_id: str = Field(min_length=1, max_length=128)
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    deadline_ms: float = Field(gt=0, le=600_000)
    tensor: WireTensor


class Result(_H):
    type: Literal["result"] = "result"
    request_id: str
    tensor: WireTensor
    queue_ms: float
    exec_ms: float
    block_ms: list[float] = []


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
    block: int | None = Field(default=None, ge=0)
    chunk: int | None = Field(default=None, ge=0)
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


class Transfer(_H):
    """Device → new edge (handoff): fetch these blocks of a model from the old edge over the
    backhaul instead of waiting for the device to upload them again."""

    type: Literal["transfer"] = "transfer"
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    source_edge: str = Field(pattern=_ID)
    source_broker: str = Field(min_length=1, max_length=256)
    blocks: list[int] = Field(min_length=1, max_length=1024)


class PeerFetch(_H):
    """New edge → old edge (on the old edge's broker): push these blocks, chunked, to my upload
    topic on your broker, in the device's name. Only blocks whose digest still verifies go."""

    type: Literal["peer_fetch"] = "peer_fetch"
    peer: str = Field(pattern=_ID)
    device: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_SHA)
    blocks: list[int] = Field(min_length=1, max_length=1024)


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
)
_HEADER: TypeAdapter[Header] = TypeAdapter(Annotated[Header, Field(discriminator="type")])


def encode(header: _H, body: bytes | bytearray | memoryview | Array = b"") -> bytes:
    if isinstance(body, np.ndarray):
        body = np.ascontiguousarray(body).data
    hb = header.model_dump_json().encode()
    if len(hb) > MAX_HEADER_BYTES:
        raise FrameError(ErrorCode.HEADER_TOO_LARGE, f"header of {len(hb)} bytes")
    return b"".join((_PREFIX.pack(MAGIC, FRAME_VERSION, len(hb)), hb, body))


def encode_tensor_frame(header_cls: type[Query] | type[Result], x: Array, **fields: Any) -> bytes:
    tensor = WireTensor(dtype=str(x.dtype), shape=tuple(x.shape))  # type: ignore[arg-type]
    return encode(header_cls(tensor=tensor, **fields), x)


def _ids(obj: object) -> tuple[str | None, str | None]:
    """(request_id, device) of a header, when present and well-formed."""
    if not isinstance(obj, dict):
        return None, None
    rid, dev = obj.get("request_id"), obj.get("device")
    return (
        rid if isinstance(rid, str) and len(rid) <= 128 else None,
        dev if isinstance(dev, str) and is_id(dev) else None,
    )


def _peek_ids(mv: memoryview, hlen: int) -> tuple[str | None, str | None]:
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(mv):
        return None, None
    try:
        return _ids(json.loads(bytes(mv[_PREFIX.size : _PREFIX.size + hlen])))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None, None


def decode(
    payload: bytes | bytearray | memoryview, *, max_body: int = MAX_BODY_BYTES
) -> tuple[Header, memoryview]:
    """(header model, body view). Raises FrameError with a code for anything malformed."""
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
    raw = bytes(mv[_PREFIX.size : _PREFIX.size + hlen])
    body = mv[_PREFIX.size + hlen :]
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise FrameError(ErrorCode.MALFORMED, f"header is not JSON: {e}") from e
    rid, dev = _ids(obj)
    try:
        header = _HEADER.validate_python(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FrameError(ErrorCode.INVALID_HEADER, f"{where}: {first['msg']}", rid, dev) from e
    if len(body) > max_body:
        raise FrameError(
            ErrorCode.TOO_LARGE, f"body of {len(body)} bytes exceeds {max_body}", rid, dev
        )
    tensor = getattr(header, "tensor", None)
    if tensor is not None and tensor.nbytes != len(body):
        raise FrameError(
            ErrorCode.SIZE_MISMATCH,
            f"tensor {tensor.dtype}{list(tensor.shape)} needs {tensor.nbytes} bytes, "
            f"body has {len(body)}",
            rid,
            dev,
        )
    return header, body


def tensor_of(header: Query | Result, body: memoryview) -> Array:
    """The body as an array: a read-only, zero-copy view of the payload."""
    t = header.tensor
    return np.frombuffer(body, dtype=np.dtype(t.dtype)).reshape(t.shape)
