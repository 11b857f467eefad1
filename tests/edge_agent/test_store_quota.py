"""The store's quotas and expiry: bytes per device and in total, models per device, partial
uploads reserved at their declared size and dropped when left, eviction of the least recently
used blocks no one is using. Real files on disk; the clock is the test's."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edge_agent.store import (
    BlockStore,
    StoreError,
    StoreLimits,
    block_last_use,
    plan_eviction,
)
from iotoffload.transport.frame import Announce, ErrorCode
from tests.edge_agent.test_store import chunks_of, model_of


def blob(n: int, seed: str) -> bytes:
    return (hashlib.sha256(seed.encode()).digest() * (n // 32 + 1))[:n]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def upload(s: BlockStore, a: Announce, i: int, data: bytes, device: str | None = None) -> None:
    for h, body in chunks_of(a, i, data, 256, device):
        s.put_chunk(h, body)


def first_chunk(s: BlockStore, a: Announce, i: int, data: bytes) -> None:
    s.put_chunk(*chunks_of(a, i, data, 256)[0])


# pure logic: the eviction order ---------------------------------------------------------------
def test_plan_eviction_takes_unneeded_blocks_then_the_least_recently_used() -> None:
    sizes = {"orphan": 10, "old": 30, "mid": 30, "new": 30}
    last = {"old": 1.0, "mid": 2.0, "new": 3.0}  # "orphan": no model needs it
    assert plan_eviction(sizes, last, set(), 0) == []
    assert plan_eviction(sizes, last, set(), 5) == ["orphan"]
    assert plan_eviction(sizes, last, set(), 11) == ["orphan", "old"]
    assert plan_eviction(sizes, last, {"old"}, 11) == ["orphan", "mid"]
    assert plan_eviction(sizes, last, set(), 100) == ["orphan", "old", "mid", "new"]
    assert plan_eviction(sizes, last, set(), 101) is None  # more than everything
    assert plan_eviction(sizes, last, {"new"}, 71) is None  # more than what may go


def test_plan_eviction_breaks_ties_by_digest() -> None:
    assert plan_eviction({"b": 1, "a": 1, "c": 1}, {"a": 5.0, "b": 5.0}, set(), 2) == ["c", "a"]


def test_a_block_is_as_recent_as_the_latest_model_holding_it() -> None:
    models = {"m1": ["x", "y"], "m2": ["y", "z"], "m3": ["w"]}
    got = block_last_use(models, {"m1": 1.0, "m2": 5.0})
    assert got == {"x": 1.0, "y": 5.0, "z": 5.0, "w": 0.0}  # m3 never used: announced at 0


# bytes per device ----------------------------------------------------------------------------
def test_a_partial_upload_reserves_its_declared_size_from_its_first_chunk(tmp_path: Path) -> None:
    b0, b1 = blob(1000, "a"), blob(1000, "b")
    a = model_of([b0, b1])
    s = BlockStore(tmp_path, limits=StoreLimits(device_max_bytes=1500))
    s.put_model(a)
    first_chunk(s, a, 0, b0)  # one chunk of 256 bytes reserves all 1000
    assert s.device_usage("d1") == (1000, 1)
    with pytest.raises(StoreError) as e:
        first_chunk(s, a, 1, b1)
    assert e.value.code is ErrorCode.QUOTA
    assert "device d1 has 1000 bytes stored or reserved" in str(e.value)
    assert "device_max_bytes is 1500" in str(e.value)
    assert s.missing_chunks(sha(b1)) is None and not (tmp_path / "partial" / sha(b1)).exists()
    upload(s, a, 0, b0)
    assert s.has_block(sha(b0)) and s.device_usage("d1") == (1000, 1)  # reserved, then stored
    u = s.usage()
    assert (u.blocks, u.bytes, u.partials, u.partial_bytes) == (1, 1000, 0, 0)


def test_a_shared_block_is_charged_to_its_first_uploader_only(tmp_path: Path) -> None:
    b0 = blob(1000, "a")
    a1, a2 = model_of([b0], device="d1"), model_of([b0], device="d2", name="same chain")
    s = BlockStore(tmp_path, limits=StoreLimits(device_max_bytes=1000))
    s.put_model(a1)
    s.put_model(a2)
    upload(s, a1, 0, b0)
    assert s.put_chunk(*chunks_of(a2, 0, b0, 256)[0]) is True  # stored already: free for d2
    assert s.device_usage("d1") == (1000, 1) and s.device_usage("d2") == (0, 1)
    again = BlockStore(tmp_path, limits=StoreLimits(device_max_bytes=1000))
    assert again.device_usage("d1") == (1000, 1) and again.device_usage("d2") == (0, 1)


def test_device_quota_survives_a_restart_with_partials_and_blocks(tmp_path: Path) -> None:
    b0, b1, b2 = blob(600, "a"), blob(600, "b"), blob(600, "c")
    a = model_of([b0, b1, b2])
    lim = StoreLimits(device_max_bytes=1500)
    s = BlockStore(tmp_path, limits=lim)
    s.put_model(a)
    upload(s, a, 0, b0)
    first_chunk(s, a, 1, b1)
    again = BlockStore(tmp_path, limits=lim)
    assert again.device_usage("d1") == (1200, 1)
    assert again.usage().partial_bytes == 600
    with pytest.raises(StoreError) as e:
        first_chunk(again, a, 2, b2)
    assert e.value.code is ErrorCode.QUOTA


def test_another_chunking_of_a_partial_moves_its_reservation(tmp_path: Path) -> None:
    b0 = blob(1000, "a")
    a1, a2 = model_of([b0], device="d1"), model_of([b0], device="d2")
    s = BlockStore(tmp_path)
    s.put_model(a1)
    s.put_model(a2)
    first_chunk(s, a1, 0, b0)
    s.put_chunk(*chunks_of(a2, 0, b0, 500)[0])  # d2 restarts it in other chunks: d2's now
    assert s.device_usage("d1") == (0, 1) and s.device_usage("d2") == (1000, 1)
    assert s.usage().partial_bytes == 1000 and s.missing_chunks(sha(b0)) == [1]


# models per device ---------------------------------------------------------------------------
def test_announces_past_device_max_models_are_quota(tmp_path: Path) -> None:
    lim = StoreLimits(device_max_models=2)
    s = BlockStore(tmp_path, limits=lim)
    models = [model_of([blob(10, str(k))]) for k in range(3)]
    s.put_model(models[0])
    s.put_model(models[1])
    s.put_model(models[0])  # announced again: not a new one
    with pytest.raises(StoreError, match="d1 has announced 2 models, device_max_models is 2"):
        s.put_model(models[2])
    assert s.model(models[2].model_id) is None
    s.put_model(models[2].model_copy(update={"device": "d2"}))  # another device's own count
    again = BlockStore(tmp_path, limits=lim)
    assert again.device_usage("d1") == (0, 2)
    with pytest.raises(StoreError) as e:
        again.put_model(models[2])
    assert e.value.code is ErrorCode.QUOTA


# expiry --------------------------------------------------------------------------------------
def test_a_partial_upload_expires_after_its_last_chunk(tmp_path: Path) -> None:
    clock = Clock()
    b0 = blob(1000, "a")
    a = model_of([b0])
    s = BlockStore(tmp_path, limits=StoreLimits(partial_expiry_s=60), clock=clock)
    s.put_model(a)
    chunks = chunks_of(a, 0, b0, 256)
    s.put_chunk(*chunks[0])
    clock.t += 50
    s.put_chunk(*chunks[1])  # the expiry counts from here
    clock.t += 59
    assert s.expire_partials() == 0 and s.missing_chunks(sha(b0)) == [2, 3]
    clock.t += 1
    assert s.expire_partials() == 1
    assert s.missing_chunks(sha(b0)) is None
    assert not (tmp_path / "partial" / sha(b0)).exists()
    assert s.device_usage("d1") == (0, 1) and s.usage().partial_bytes == 0
    assert s.usage().expired == 1 and s.usage().total_bytes == s.usage().bytes + _models(s)


def _models(s: BlockStore) -> int:
    return sum(p.stat().st_size for p in (s.root / "models").glob("*.json"))


def test_partial_uploads_left_too_long_expire_at_open(tmp_path: Path) -> None:
    b0, b1 = blob(1000, "a"), blob(1000, "b")
    a = model_of([b0, b1])
    s = BlockStore(tmp_path)
    s.put_model(a)
    first_chunk(s, a, 0, b0)
    first_chunk(s, a, 1, b1)
    d = tmp_path / "partial" / sha(b0)
    (d / ".00001.part.tmp-1-2").write_bytes(b"x")  # a kill's leftover: removing it at open
    old = d.stat().st_mtime - 7200  # must not make the upload look recent
    os.utime(d, (old, old))  # last chunk two hours ago
    again = BlockStore(tmp_path, limits=StoreLimits(partial_expiry_s=3600))
    assert again.missing_chunks(sha(b0)) is None and again.missing_chunks(sha(b1)) == [1, 2, 3]
    assert not d.exists()
    assert again.device_usage("d1") == (1000, 1) and again.usage().expired == 1


# eviction ------------------------------------------------------------------------------------
def _three_models(
    tmp_path: Path, in_use: set[str] | None = None
) -> tuple[BlockStore, Clock, list[Announce], list[bytes]]:
    """Three one-block models of 1000 bytes, uploaded and used at t = 1001, 1002, 1003, in a
    store whose cap leaves no room for a fourth."""
    clock = Clock()
    datas = [blob(1000, f"m{k}") for k in range(4)]
    models = [model_of([d], name=f"m{k}") for k, d in enumerate(datas)]
    kept = in_use if in_use is not None else set()
    s = BlockStore(
        tmp_path,
        clock=clock,
        in_use=lambda: kept,
        limits=StoreLimits(store_max_bytes=3500 + 4 * _model_file_bytes(models[0])),
    )
    for a in models:
        s.put_model(a)
    for a, d in zip(models[:3], datas[:3], strict=True):
        upload(s, a, 0, d)
    for k, a in enumerate(models[:3]):
        clock.t = 1001 + k
        s.touch(a.model_id)
    clock.t = 1010
    return s, clock, models, datas


def _model_file_bytes(a: Announce) -> int:
    return len(a.model_dump_json().encode())


def test_a_full_store_evicts_the_least_recently_used_block(tmp_path: Path) -> None:
    s, _, models, datas = _three_models(tmp_path)
    s.touch(models[0].model_id)  # m0 used now: m1 is the oldest
    upload(s, models[3], 0, datas[3])
    assert [s.has_block(sha(d)) for d in datas] == [True, False, True, True]
    assert s.usage().evicted == 1 and s.usage().total_bytes <= s.limits.store_max_bytes
    assert s.device_usage("d1")[0] == 3000  # the evicted block's charge is freed


def test_a_block_in_use_is_never_evicted(tmp_path: Path) -> None:
    in_use: set[str] = set()
    s, _, models, datas = _three_models(tmp_path, in_use)
    in_use.add(sha(datas[0]))  # the oldest is loaded: the next oldest goes
    upload(s, models[3], 0, datas[3])
    assert [s.has_block(sha(d)) for d in datas] == [True, False, True, True]


def test_when_nothing_may_be_evicted_the_upload_is_quota_and_nothing_goes(
    tmp_path: Path,
) -> None:
    in_use: set[str] = set()
    s, _, _, datas = _three_models(tmp_path, in_use)
    in_use.update(sha(d) for d in datas[1:3])  # only m0's block may go: not enough for 2000
    big = blob(2000, "big")
    a = model_of([big], name="big")
    s.put_model(a)
    with pytest.raises(StoreError) as e:
        first_chunk(s, a, 0, big)
    assert e.value.code is ErrorCode.QUOTA and "store_max_bytes" in str(e.value)
    assert all(s.has_block(sha(d)) for d in datas[:3]) and s.usage().evicted == 0


def test_blocks_no_announced_model_needs_go_first(tmp_path: Path) -> None:
    s, _, models, datas = _three_models(tmp_path)
    del s
    orphan = blob(1000, "orphan")  # a block of an older store: no model here needs it
    (tmp_path / "blocks" / f"{sha(orphan)}.onnx").write_bytes(orphan)
    s = BlockStore(
        tmp_path, limits=StoreLimits(store_max_bytes=4500 + 4 * _model_file_bytes(models[0]))
    )
    assert s.has_block(sha(orphan))
    upload(s, models[3], 0, datas[3])
    assert not s.has_block(sha(orphan)) and all(s.has_block(sha(d)) for d in datas)
    assert not (tmp_path / "blocks" / f"{sha(orphan)}.onnx").exists()


def test_an_upload_never_evicts_the_blocks_of_its_own_model(tmp_path: Path) -> None:
    clock = Clock()
    d0, d1 = blob(1000, "x"), blob(1000, "y")
    a = model_of([d0, d1])
    s = BlockStore(
        tmp_path,
        clock=clock,
        limits=StoreLimits(store_max_bytes=1500 + _model_file_bytes(a)),
    )
    s.put_model(a)
    upload(s, a, 0, d0)
    with pytest.raises(StoreError) as e:
        first_chunk(s, a, 1, d1)
    assert e.value.code is ErrorCode.QUOTA and s.has_block(sha(d0))


def test_the_last_use_survives_a_restart_once_saved(tmp_path: Path) -> None:
    s, _, models, datas = _three_models(tmp_path)
    s.touch(models[0].model_id)  # m0 used last, m1 is the oldest ...
    s.expire_partials()  # ... saved here (touch itself is memory only)
    cap = s.limits
    again = BlockStore(tmp_path, limits=cap)
    upload(again, models[3], 0, datas[3])
    assert [again.has_block(sha(d)) for d in datas] == [True, False, True, True]


def test_an_evicted_block_can_be_uploaded_again(tmp_path: Path) -> None:
    s, _, models, datas = _three_models(tmp_path)
    upload(s, models[3], 0, datas[3])  # evicts m0's block
    assert not s.has_block(sha(datas[0]))
    s.touch(models[3].model_id)
    upload(s, models[0], 0, datas[0])  # m1's block goes now
    assert [s.has_block(sha(d)) for d in datas] == [True, False, True, True]


# remove_block (quarantine) -------------------------------------------------------------------
def test_remove_block_deletes_the_file_and_frees_its_charge(tmp_path: Path) -> None:
    d0, d1 = blob(1000, "a"), blob(1000, "b")
    a = model_of([d0, d1])
    s = BlockStore(tmp_path)
    s.put_model(a)
    upload(s, a, 0, d0)
    first_chunk(s, a, 1, d1)
    assert s.remove_block(sha(d0)) is True and s.remove_block(sha(d1)) is True
    assert s.remove_block(sha(d0)) is False
    assert not s.has_block(sha(d0)) and s.missing_chunks(sha(d1)) is None
    assert s.device_usage("d1") == (0, 1)
    assert not list((tmp_path / "blocks").iterdir()) and not list((tmp_path / "partial").iterdir())
    assert not BlockStore(tmp_path).has_block(sha(d0))


def test_a_block_committed_after_its_partial_expired_is_charged_anew(tmp_path: Path) -> None:
    clock = Clock()
    d0 = blob(1000, "a")
    a = model_of([d0])
    s = BlockStore(tmp_path, clock=clock, limits=StoreLimits(partial_expiry_s=10))
    s.put_model(a)
    chunks = chunks_of(a, 0, d0, 256)
    for h, body in chunks:
        s.put_chunk(h, body, finish=False)
    data = s.check_block(chunks[-1][0])  # on the loader, while the writer ...
    clock.t += 10
    assert s.expire_partials() == 1  # ... expires it
    assert s.device_usage("d1") == (0, 1)
    assert s.commit_block(chunks[-1][0], data) is True
    assert s.device_usage("d1") == (1000, 1) and s.usage().partial_bytes == 0
