"""Encoded uploads in the store: chunks of the encoded stream, decoded (bounded) when the
block completes, checked on the decoded bytes, resumed only in the same encoding."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.store import BlockStore, PartialUpload, StoreError
from iotoffload.model.block_codec import Encoding, encode
from iotoffload.transport.frame import Announce, ErrorCode, UploadChunk
from tests.edge_agent.test_store import model_of, store

RAW = b"onnx" + np.random.default_rng(0).normal(0, 0.05, 20_000).astype("float32").tobytes()
SHA = hashlib.sha256(RAW).hexdigest()
MODEL = model_of([RAW])


def encoded_chunks(
    stream: bytes, size: int = 16_384, enc: Encoding = "shuffle4-zlib", a: Announce = MODEL
) -> list[tuple[UploadChunk, bytes]]:
    n = -(-len(stream) // size)
    return [
        (
            UploadChunk(
                device=a.device,
                model_id=a.model_id,
                block=0,
                block_sha256=a.blocks[0].onnx_sha256,
                block_bytes=a.blocks[0].onnx_bytes,
                chunk=c,
                chunks=n,
                chunk_size=size,
                encoding=enc,
                stream_bytes=len(stream),
            ),
            stream[c * size : (c + 1) * size],
        )
        for c in range(n)
    ]


def test_an_encoded_upload_stores_the_decoded_block(tmp_path: Path) -> None:
    stream = encode(RAW, "shuffle4-zlib")
    assert len(stream) < 0.95 * len(RAW)
    s = store(tmp_path, MODEL)
    chunks = encoded_chunks(stream)
    assert sum(len(b) for _, b in chunks) == len(stream)  # the stream is what travels
    for h, body in chunks:
        s.put_chunk(h, body)
    assert s.has_block(SHA)
    assert s.block_path(SHA).read_bytes() == RAW  # content-addressed by the decoded digest
    assert s.usage().bytes == len(RAW)


def test_a_bomb_is_a_bad_encoding_and_nothing_is_kept(tmp_path: Path) -> None:
    # a stream of far more than the announced bytes: decoding stops at block_bytes
    bomb = zlib.compress(bytes(50_000_000), 9)
    assert len(bomb) < len(RAW)
    s = store(tmp_path, MODEL)
    *first, last = encoded_chunks(bomb)
    for h, body in first:
        s.put_chunk(h, body)
    with pytest.raises(StoreError) as e:
        s.put_chunk(*last)
    assert e.value.code == ErrorCode.BAD_ENCODING and "longer" in str(e.value)
    assert not s.has_block(SHA) and s.missing_chunks(SHA) is None  # definitive: dropped
    assert s.usage().partial_bytes == 0 and s.device_usage("d1") == (0, 1)


def test_a_stream_of_other_bytes_is_a_digest_mismatch(tmp_path: Path) -> None:
    other = bytearray(RAW)
    other[100] ^= 1
    s = store(tmp_path, MODEL)
    with pytest.raises(StoreError) as e:
        for h, body in encoded_chunks(encode(bytes(other), "shuffle4-zlib")):
            s.put_chunk(h, body)
    assert e.value.code == ErrorCode.DIGEST_MISMATCH
    assert not s.has_block(SHA)


def test_a_partial_encoded_upload_resumes_after_a_restart_and_says_its_encoding(
    tmp_path: Path,
) -> None:
    chunks = encoded_chunks(encode(RAW, "shuffle4-zlib"))
    s = store(tmp_path, MODEL)
    s.put_chunk(*chunks[1])
    s.put_chunk(*chunks[3])
    again = BlockStore(tmp_path)
    assert again.partial_upload(SHA) == PartialUpload([0, 2, 4], 16_384, "shuffle4-zlib")
    for i in (0, 2, 4):
        again.put_chunk(*chunks[i])
    assert again.block_path(SHA).read_bytes() == RAW


def test_another_encoding_restarts_the_partial_upload(tmp_path: Path) -> None:
    s = store(tmp_path, MODEL)
    enc4 = encoded_chunks(encode(RAW, "shuffle4-zlib"))
    s.put_chunk(*enc4[0])
    enc2 = encoded_chunks(encode(RAW, "shuffle2-zlib"), enc="shuffle2-zlib")
    s.put_chunk(*enc2[0])  # other bytes: the chunks so far do not fit it
    p = s.partial_upload(SHA)
    assert p is not None and p.encoding == "shuffle2-zlib" and 0 not in p.missing
    assert len(p.missing) == len(enc2) - 1
    for h, body in enc2[1:]:
        s.put_chunk(h, body)
    assert s.block_path(SHA).read_bytes() == RAW
    assert s.usage().partial_bytes == 0  # the replaced upload's reservation was freed


def test_the_frame_refuses_inconsistent_encodings() -> None:
    h = encoded_chunks(encode(RAW, "shuffle4-zlib"))[0][0]
    fields = h.model_dump()
    with pytest.raises(ValidationError, match="exceeds block_bytes"):
        UploadChunk.model_validate({**fields, "stream_bytes": len(RAW) + 1})
    with pytest.raises(ValidationError, match="stream_bytes goes with"):
        UploadChunk.model_validate({**fields, "stream_bytes": None})
    with pytest.raises(ValidationError, match="stream_bytes goes with"):
        UploadChunk.model_validate({**fields, "encoding": "identity"})
    with pytest.raises(ValidationError):
        UploadChunk.model_validate({**fields, "encoding": "lz4"})


@pytest.mark.parametrize(
    "meta",
    [
        {"encoding": "lz4"},  # not one of ours
        {"stream_bytes": len(RAW) + 1},  # longer than the block
        {"encoding": "identity"},  # identity with a stream length
    ],
)
def test_a_tampered_partial_record_is_not_resumed(tmp_path: Path, meta: dict[str, object]) -> None:
    import json

    s = store(tmp_path, MODEL)
    s.put_chunk(*encoded_chunks(encode(RAW, "shuffle4-zlib"))[0])
    f = tmp_path / "partial" / SHA / "meta.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **meta}))
    again = BlockStore(tmp_path)
    assert again.partial_upload(SHA) is None  # dropped: chunks of an unknown stream
