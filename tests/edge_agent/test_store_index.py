"""The store's in-memory index: a chunk costs its own write, nothing is read back per chunk,
and a partial upload is dropped only once its block is written or can never be."""

from __future__ import annotations

import hashlib
import os
import pathlib
import resource
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_agent.store import BlockStore, StoreError
from iotoffload.transport.frame import ErrorCode, UploadChunk
from tests.edge_agent.conftest import full_disk
from tests.edge_agent.test_store import chunks_of, model_of


def _chunks(n: int, seed: bytes = b"") -> tuple[str, list[tuple[UploadChunk, bytes]]]:
    """A block of ``n`` one-byte chunks (of MODELS[n], announced by ``_store``)."""
    data = _data(n, seed)
    return hashlib.sha256(data).hexdigest(), chunks_of(model_of([data]), 0, data, 1)


def _data(n: int, seed: bytes = b"") -> bytes:
    return (hashlib.sha256(seed + str(n).encode()).digest() * (n // 32 + 1))[:n]


def _store(root: Path, *sizes: int) -> BlockStore:
    """A store where models of one block of each size (``_chunks``) are announced."""
    s = BlockStore(root)
    for n in sizes:
        s.put_model(model_of([_data(n)]))
    return s


# every way of looking at the file system: stat, existence, directory listings
_LOOKS: list[tuple[Any, str]] = [
    (pathlib.Path, "stat"),
    (pathlib.Path, "is_file"),
    (pathlib.Path, "is_dir"),
    (pathlib.Path, "exists"),
    (pathlib.Path, "iterdir"),
    (pathlib.Path, "glob"),
    (os, "stat"),
    (os, "lstat"),
    (os, "listdir"),
    (os, "scandir"),
]


@contextmanager
def counting_looks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    calls: Counter[str] = Counter()

    def wrap(owner: Any, name: str) -> Callable[..., Any]:
        real = getattr(owner, name)

        def counted(*a: Any, **kw: Any) -> Any:
            calls[f"{getattr(owner, '__name__', owner)}.{name}"] += 1
            return real(*a, **kw)

        return counted

    with monkeypatch.context() as m:
        for owner, name in _LOOKS:
            m.setattr(owner, name, wrap(owner, name))
        yield calls


def _looks_for_upload(tmp_path: Path, n: int, monkeypatch: pytest.MonkeyPatch) -> int:
    store = _store(tmp_path / f"s{n}", n)
    sha, chunks = _chunks(n)
    with counting_looks(monkeypatch) as calls:
        done = [store.put_chunk(h, body, finish=False) for h, body in chunks]
    assert done == [False] * (n - 1) + [True]
    assert store.missing_chunks(sha) == []
    return sum(calls.values())


def test_put_chunk_does_not_look_at_the_chunks_already_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = _looks_for_upload(tmp_path, 200, monkeypatch)
    big = _looks_for_upload(tmp_path, 2000, monkeypatch)
    # the partial's directory is set up once; no chunk stats, lists or re-reads anything
    assert big == small <= 5, (small, big)


def test_received_chunks_are_read_from_disk_once_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha, chunks = _chunks(300)
    first = _store(tmp_path, 300)
    for h, body in chunks[::2]:
        first.put_chunk(h, body)
    again = BlockStore(tmp_path)  # the restart reads the partial upload here, once
    assert again.missing_chunks(sha) == list(range(1, 300, 2))
    with counting_looks(monkeypatch) as calls:
        for h, body in chunks[1:-2:2]:
            assert again.put_chunk(h, body, finish=False) is False
    assert sum(calls.values()) == 0
    assert again.put_chunk(*chunks[-1]) is True
    assert again.block_path(sha).read_bytes() == b"".join(b for _, b in chunks)


def test_a_chunk_on_a_full_disk_is_store_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _store(tmp_path, 3)
    sha, chunks = _chunks(3)
    s.put_chunk(*chunks[0])
    # a real failing write (RLIMIT_FSIZE: EFBIG, where a full disk gives ENOSPC)
    with write_limit(0), pytest.raises(StoreError) as e:
        s.put_chunk(*chunks[1])
    assert e.value.code is ErrorCode.STORE_FAILED and not e.value.definitive
    assert s.missing_chunks(sha) == [1, 2]  # the failed chunk is not counted as received
    assert not [p for p in (tmp_path / "partial" / sha).iterdir() if ".tmp-" in p.name]
    s.put_chunk(*chunks[1])
    assert s.put_chunk(*chunks[2]) is True


@contextmanager
def write_limit(nbytes: int) -> Iterator[None]:
    """Writes past ``nbytes`` of any file fail (EFBIG) in this process, while inside."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, sig)


def test_the_chunks_stay_until_the_block_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _store(tmp_path, 4)
    sha, chunks = _chunks(4)
    for h, body in chunks[:-1]:
        s.put_chunk(h, body)
    full_disk(monkeypatch, "blocks")
    with pytest.raises(StoreError) as e:
        s.put_chunk(*chunks[-1])  # every chunk is here; the block itself does not fit
    assert e.value.code is ErrorCode.STORE_FAILED
    assert not s.has_block(sha) and s.missing_chunks(sha) == []
    assert BlockStore(tmp_path).missing_chunks(sha) == []  # on disk too, for a restart
    monkeypatch.undo()
    assert s.finish_block(chunks[-1][0]) is True
    assert s.has_block(sha) and s.missing_chunks(sha) is None
    assert not (tmp_path / "partial" / sha).exists()


def test_check_then_commit_is_finish_split_over_two_threads(tmp_path: Path) -> None:
    """The edge checks a block on its loader (reads only) and commits it on the store thread."""
    s = _store(tmp_path, 5)
    sha, chunks = _chunks(5)
    for h, body in chunks:
        s.put_chunk(h, body, finish=False)
    h = chunks[-1][0]
    blob = s.check_block(h)
    assert not s.has_block(sha) and s.missing_chunks(sha) == []  # nothing written yet
    assert s.commit_block(h, blob) is True
    assert s.commit_block(h, blob) is False  # a duplicate: stored once
    assert BlockStore(tmp_path).has_block(sha)


def test_a_definitive_failure_drops_only_its_own_partial(tmp_path: Path) -> None:
    sha, chunks = _chunks(4)
    liar = model_of([("ab" * 32, 4)])  # announces a digest its bytes do not have
    s = _store(tmp_path, 4)
    s.put_model(liar)
    bad = chunks_of(liar, 0, b"".join(b for _, b in chunks), 1)
    for h, body in bad[:-1]:
        s.put_chunk(h, body)
    with pytest.raises(StoreError) as e:
        s.put_chunk(*bad[-1])
    assert e.value.code is ErrorCode.DIGEST_MISMATCH and e.value.definitive
    assert s.missing_chunks("ab" * 32) is None
    # a restarted upload of another chunking is not dropped by a stale failure
    other = bad[0][0].model_copy(update={"chunk_size": 2, "chunks": 2})
    s.put_chunk(other, b"xy")
    s.discard_partial(bad[0][0])
    assert s.missing_chunks("ab" * 32) == [1]
    assert s.missing_chunks(sha) is None
