"""The block store: chunks to blocks, checks on every chunk, models. The helpers here
(``model_of``, ``chunks_of``) are shared by the other store tests."""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import EdgeConfig
from edge_agent.store import BlockStore, StoreError, StoreLimits
from iotoffload.model.manifest import TensorSpec, compute_model_id
from iotoffload.transport.frame import Announce, BlockInfo, ErrorCode, UploadChunk

BLOB = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(BLOB).hexdigest()
T = TensorSpec(name="x", shape=(1, 4))


def model_of(
    blocks: Sequence[bytes | tuple[str, int]], device: str = "d1", name: str = ""
) -> Announce:
    """An announce of a chain of blocks, each given by its bytes or as (sha256, size)."""
    infos = [
        BlockInfo(
            onnx_sha256=b[0] if isinstance(b, tuple) else hashlib.sha256(b).hexdigest(),
            onnx_bytes=b[1] if isinstance(b, tuple) else len(b),
            input=T,
            output=T,
        )
        for b in blocks
    ]
    model_id = compute_model_id([i.onnx_sha256 for i in infos])
    return Announce(device=device, model_id=model_id, name=name, blocks=infos)


def chunks_of(
    a: Announce, i: int, data: bytes, size: int, device: str | None = None
) -> list[tuple[UploadChunk, bytes]]:
    """Block ``i`` of a model, as its upload chunks (of its announced digest and size)."""
    b = a.blocks[i]
    n = -(-b.onnx_bytes // size)
    return [
        (
            UploadChunk(
                device=device or a.device,
                model_id=a.model_id,
                block=i,
                block_sha256=b.onnx_sha256,
                block_bytes=b.onnx_bytes,
                chunk=c,
                chunks=n,
                chunk_size=size,
            ),
            data[c * size : (c + 1) * size],
        )
        for c in range(n)
    ]


MODEL = model_of([BLOB])


def chunk(i: int, size: int = 4096, a: Announce = MODEL) -> tuple[UploadChunk, bytes]:
    return chunks_of(a, 0, BLOB, size)[i]


def store(root: Path, *announces: Announce, **kw: Any) -> BlockStore:
    """A store at ``root`` where ``announces`` (default: MODEL) were announced."""
    s = BlockStore(root, **kw)
    for a in announces or (MODEL,):
        s.put_model(a)
    return s


def test_chunks_in_any_order_complete_the_block(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.put_chunk(*chunk(2)) is False
    assert s.missing_chunks(SHA) == [0, 1]
    assert s.put_chunk(*chunk(0)) is False
    assert s.put_chunk(*chunk(1)) is True
    assert s.block_path(SHA).read_bytes() == BLOB
    assert s.missing_chunks(SHA) is None
    assert s.put_chunk(*chunk(1)) is True  # already stored: nothing to do


def test_partial_upload_survives_a_restart(tmp_path: Path) -> None:
    store(tmp_path).put_chunk(*chunk(0))
    again = BlockStore(tmp_path)
    assert again.missing_chunks(SHA) == [1, 2]
    again.put_chunk(*chunk(1))
    assert again.put_chunk(*chunk(2)) is True
    assert BlockStore(tmp_path).has_block(SHA)


def test_wrong_digest_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    bad = "f" * 64
    liar = model_of([(bad, len(BLOB))])  # announces a digest its bytes do not have
    s = store(tmp_path, liar)
    s.put_chunk(*chunk(0, a=liar))
    s.put_chunk(*chunk(1, a=liar))
    with pytest.raises(StoreError) as e:
        s.put_chunk(*chunk(2, a=liar))
    assert e.value.code == "digest_mismatch"
    assert not s.has_block(bad) and s.missing_chunks(bad) is None
    assert s.usage().partial_bytes == 0 and s.device_usage("d1") == (0, 1)


def test_size_checks(tmp_path: Path) -> None:
    s = store(tmp_path / "a", max_block_bytes=1000)
    with pytest.raises(StoreError) as e:
        s.put_chunk(*chunk(0))
    assert e.value.code == "too_large"
    s = store(tmp_path / "b")
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

    s = store(tmp_path, screen=refuse)
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


# every chunk names a block its device announced ("600 MB of partial uploads in 5 s, no
# announce"): refused before anything is written
def _nothing_written(root: Path) -> bool:
    return not any((root / "partial").iterdir()) and not any((root / "blocks").iterdir())


def test_a_chunk_of_a_model_never_announced_is_unknown_model(tmp_path: Path) -> None:
    s = BlockStore(tmp_path)
    with pytest.raises(StoreError, match="not announced by d1") as e:
        s.put_chunk(*chunk(0))
    assert e.value.code is ErrorCode.UNKNOWN_MODEL and e.value.definitive
    assert _nothing_written(tmp_path) and s.usage().partials == 0


def test_a_chunk_of_a_model_another_device_announced_is_unknown_model(tmp_path: Path) -> None:
    s = store(tmp_path, model_of([BLOB], device="d2"))
    with pytest.raises(StoreError) as e:
        s.put_chunk(*chunk(0, a=MODEL))  # same model id, sent by d1
    assert e.value.code is ErrorCode.UNKNOWN_MODEL
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"block": 1},  # the model has one block
        {"block_sha256": "e" * 64},  # not the announced digest
        {"block_bytes": len(BLOB) + 1, "chunks": 3},  # not the announced size
    ],
)
def test_a_chunk_of_a_block_not_announced_so_is_invalid(
    tmp_path: Path, change: dict[str, object]
) -> None:
    s = store(tmp_path)
    h, body = chunk(0)
    with pytest.raises(StoreError) as e:
        s.put_chunk(h.model_copy(update=change), body)
    assert e.value.code is ErrorCode.INVALID_CHUNK
    assert _nothing_written(tmp_path)


def test_chunks_past_max_chunks_are_refused(tmp_path: Path) -> None:
    s = store(tmp_path, limits=StoreLimits(max_chunks=3))
    with pytest.raises(StoreError, match="max_chunks") as e:
        s.put_chunk(*chunk(0, size=2048))  # 5 chunks
    assert e.value.code is ErrorCode.INVALID_CHUNK
    assert s.put_chunk(*chunk(0, size=4096)) is False  # 3 chunks: fine


def test_the_limits_default_to_the_edge_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("IOTOFFLOAD_EDGE_"):
            monkeypatch.delenv(k)
    cfg = EdgeConfig()
    lim = StoreLimits()
    for name in StoreLimits.__dataclass_fields__:
        assert getattr(lim, name) == getattr(cfg, name), name
    default = inspect.signature(BlockStore).parameters["max_block_bytes"].default
    assert default == cfg.max_block_bytes
