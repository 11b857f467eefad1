from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edge_agent.store import BlockStore, StoreError
from iotoffload.model.manifest import TensorSpec, compute_model_id
from iotoffload.transport.frame import Announce, BlockInfo, UploadChunk

BLOB = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(BLOB).hexdigest()


def chunk(
    i: int, size: int = 4096, sha: str = SHA, data: bytes = BLOB
) -> tuple[UploadChunk, bytes]:
    n = -(-len(data) // size)
    h = UploadChunk(
        device="d1",
        model_id="0" * 64,
        block=0,
        block_sha256=sha,
        block_bytes=len(data),
        chunk=i,
        chunks=n,
        chunk_size=size,
    )
    return h, data[i * size : (i + 1) * size]


def test_chunks_in_any_order_complete_the_block(tmp_path: Path) -> None:
    s = BlockStore(tmp_path)
    assert s.put_chunk(*chunk(2)) is False
    assert s.missing_chunks(SHA) == [0, 1]
    assert s.put_chunk(*chunk(0)) is False
    assert s.put_chunk(*chunk(1)) is True
    assert s.block_path(SHA).read_bytes() == BLOB
    assert s.missing_chunks(SHA) is None
    assert s.put_chunk(*chunk(1)) is True  # already stored: nothing to do


def test_partial_upload_survives_a_restart(tmp_path: Path) -> None:
    BlockStore(tmp_path).put_chunk(*chunk(0))
    again = BlockStore(tmp_path)
    assert again.missing_chunks(SHA) == [1, 2]
    again.put_chunk(*chunk(1))
    assert again.put_chunk(*chunk(2)) is True
    assert BlockStore(tmp_path).has_block(SHA)


def test_wrong_digest_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    s = BlockStore(tmp_path)
    bad = "f" * 64
    s.put_chunk(*chunk(0, sha=bad))
    s.put_chunk(*chunk(1, sha=bad))
    with pytest.raises(StoreError) as e:
        s.put_chunk(*chunk(2, sha=bad))
    assert e.value.code == "digest_mismatch"
    assert not s.has_block(bad) and s.missing_chunks(bad) is None


def test_size_checks(tmp_path: Path) -> None:
    s = BlockStore(tmp_path, max_block_bytes=1000)
    with pytest.raises(StoreError) as e:
        s.put_chunk(*chunk(0))
    assert e.value.code == "too_large"
    s = BlockStore(tmp_path)
    h, body = chunk(0)
    with pytest.raises(StoreError) as e:
        s.put_chunk(h, body[:-1])
    assert e.value.code == "size_mismatch"
    with pytest.raises(StoreError) as e:
        s.put_chunk(h.model_copy(update={"chunks": 7}), body)
    assert e.value.code == "invalid_chunk"


def test_screening_failure_is_a_rejected_block(tmp_path: Path) -> None:
    def refuse(_data: bytes) -> None:
        raise ValueError("custom op")

    s = BlockStore(tmp_path, screen=refuse)
    with pytest.raises(StoreError) as e:
        s.put_chunk(*chunk(0, size=len(BLOB)))
    assert e.value.code == "rejected_block" and not s.has_block(SHA)


def test_models_are_checked_and_persisted(tmp_path: Path) -> None:
    t1 = TensorSpec(name="a", shape=(1, 4))
    t2 = TensorSpec(name="b", shape=(1, 2))
    blocks = [
        BlockInfo(onnx_sha256="1" * 64, onnx_bytes=5, input=t1, output=t2),
        BlockInfo(onnx_sha256="2" * 64, onnx_bytes=5, input=t2, output=t2),
    ]
    good = Announce(device="d", model_id=compute_model_id(["1" * 64, "2" * 64]), blocks=blocks)
    s = BlockStore(tmp_path)
    s.put_model(good)
    assert BlockStore(tmp_path).model(good.model_id) == good
    with pytest.raises(StoreError, match="model_id"):
        s.put_model(good.model_copy(update={"model_id": "3" * 64}))
    broken = [blocks[0], blocks[0]]
    with pytest.raises(StoreError, match="does not follow"):
        s.put_model(Announce(device="d", model_id=compute_model_id(["1" * 64] * 2), blocks=broken))
