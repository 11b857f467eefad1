"""Faults lose nothing: a full file system (a real one: a small tmpfs in a mount namespace of
its own), a failing write, a damaged file at open, and SIGKILLs at random points of storing
blocks leave every block complete and verified or absent, and every acknowledged chunk kept."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.store import BlockStore, StoreError
from iotoffload.transport.frame import Announce, ErrorCode
from tests.edge_agent.test_store import chunks_of, model_of
from tests.edge_agent.test_store_index import write_limit

REPO = Path(__file__).resolve().parents[2]
UNSHARE = ["unshare", "--mount", "--propagation", "private"]  # mounts seen by the child alone
UNSHARE = ["unshare", "--mount", "--propagation", "private"]  # mounts seen by the child alone


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def tmp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name)


def files(root: Path) -> dict[str, int]:
    """Every file under ``root`` and its size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def uploaded(
    root: Path, a: Announce, data: bytes, i: int = 0, upto: int | None = None
) -> BlockStore:
    """A store at ``root`` with model ``a`` and the first ``upto`` chunks (default: all) of
    its block ``i``."""
    s = BlockStore(root)
    s.put_model(a)
    chunks = chunks_of(a, i, data, 1024)
    for h, body in chunks[:upto]:
        s.put_chunk(h, body, finish=False)
    return s


# at open ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_a_damaged_block_is_removed_at_open_and_logged(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = blob(5000, 1), blob(5000, 2)
    a = model_of([good, bad])
    s = uploaded(tmp_path, a, good)
    s.finish_block(chunks_of(a, 0, good, 1024)[-1][0])
    for h, body in chunks_of(a, 1, bad, 1024):
        s.put_chunk(h, body)
    path = s.block_path(sha(bad))
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[:-1], "flipped": data[:99] + b"\0" + data[100:], "empty": b""}[damage]
    )
    with caplog.at_level(logging.WARNING, logger="edge_agent.store"):
        again = BlockStore(tmp_path)
    assert again.has_block(sha(good)) and not again.has_block(sha(bad))
    assert not path.exists() and not path.with_suffix(".owner").exists()
    assert again.usage().corrupt == 1 and again.device_usage("d1") == (5000, 1)
    assert f"block {sha(bad)}.onnx fails its sha256 check" in caplog.text


def test_temporary_files_a_kill_left_are_removed_at_open(tmp_path: Path) -> None:
    data = blob(5000, 1)
    a = model_of([data])
    s = uploaded(tmp_path, a, data, upto=2)
    d = tmp_path / "partial" / sha(data)
    left = [
        tmp_path / "blocks" / f".{sha(data)}.onnx.tmp-1-2",
        tmp_path / "models" / f".{a.model_id}.json.tmp-1-2",
        tmp_path / ".use.json.tmp-1-2",
        d / ".00002.part.tmp-1-2",
    ]
    for p in left:
        p.write_bytes(b"half")
    del s
    again = BlockStore(tmp_path)
    assert tmp_files(tmp_path) == []
    assert again.missing_chunks(sha(data)) == [2, 3, 4]


def test_a_chunk_of_the_wrong_size_is_dropped_at_open(tmp_path: Path) -> None:
    data = blob(5000, 1)
    a = model_of([data])
    uploaded(tmp_path, a, data, upto=3)
    d = tmp_path / "partial" / sha(data)
    (d / "00001.part").write_bytes(b"torn")  # what a power cut could leave of an unsynced file
    (d / "00007.part").write_bytes(b"x")  # past the last chunk
    again = BlockStore(tmp_path)
    assert again.missing_chunks(sha(data)) == [1, 3, 4]
    assert sorted(p.name for p in d.iterdir()) == ["00000.part", "00002.part", "meta.json"]


def test_an_owner_file_without_its_block_is_removed_at_open(tmp_path: Path) -> None:
    BlockStore(tmp_path)
    orphan = tmp_path / "blocks" / f"{'a' * 64}.owner"
    orphan.write_text("d1")
    assert BlockStore(tmp_path).device_usage("d1") == (0, 0)
    assert not orphan.exists()


# durable, in order -----------------------------------------------------------------------------
def test_the_partial_upload_goes_only_after_the_block_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's "a kill at that moment loses the whole block": the chunks are removed only
    once the block file and its directory entry are on disk (fsynced)."""
    data = blob(5000, 1)
    a = model_of([data])
    s = uploaded(tmp_path, a, data)
    events: list[tuple[str, str]] = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree

    def fsync(fd: int) -> None:
        events.append(("fsync", str(Path(f"/proc/self/fd/{fd}").readlink())))
        real_fsync(fd)

    def rmtree(path: Any, *a: Any, **kw: Any) -> None:
        events.append(("rmtree", str(path)))
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    h = chunks_of(a, 0, data, 1024)[-1][0]
    s.commit_block(h, s.check_block(h))
    monkeypatch.undo()
    tmp_block = next(i for i, (k, p) in enumerate(events) if k == "fsync" and ".onnx.tmp-" in p)
    blocks_dir = max(i for i, e in enumerate(events) if e == ("fsync", str(tmp_path / "blocks")))
    removed = events.index(("rmtree", str(tmp_path / "partial" / sha(data))))
    assert tmp_block < blocks_dir < removed, events


@pytest.mark.parametrize("what", ["model", "block", "chunk", "meta"])
def test_a_failing_write_leaves_no_temporary_file_and_keeps_the_partial(
    tmp_path: Path, what: str
) -> None:
    """A real failing write (RLIMIT_FSIZE: EFBIG, the same path as ENOSPC) of each kind."""
    data = blob(5000, 1)
    a = model_of([data])
    s = uploaded(tmp_path, a, data, upto={"meta": 0, "chunk": 4}.get(what))
    chunks = chunks_of(a, 0, data, 1024)
    other = model_of([blob(10, 2)])
    step: Callable[[], object] = {
        "model": lambda: s.put_model(other),
        "block": lambda: s.finish_block(chunks[-1][0]),
        "chunk": lambda: s.put_chunk(*chunks[-1]),
        "meta": lambda: s.put_chunk(*chunks[0]),
    }[what]
    before = files(tmp_path)
    with write_limit(0), pytest.raises(StoreError) as e:
        step()
    assert e.value.code is ErrorCode.STORE_FAILED and not e.value.definitive
    assert files(tmp_path) == before  # nothing half-written, no temporary file left
    assert s.model(other.model_id) is None and not s.has_block(sha(data))
    missing = None if what == "meta" else [4] if what == "chunk" else []
    assert s.missing_chunks(sha(data)) == missing
    assert BlockStore(tmp_path).missing_chunks(sha(data)) == missing
    if what == "meta":
        assert not (tmp_path / "partial" / sha(data)).exists()
        assert s.device_usage("d1") == (0, 1)  # the reservation is given back
    step()  # the retry, space back
    assert tmp_files(tmp_path) == []


# killed in the middle of a write ---------------------------------------------------------------
def _killed_while_writing(step: Callable[[], object], limit: int) -> int:
    """Run ``step`` in a forked child whose writes past ``limit`` bytes of a file kill it
    (RLIMIT_FSIZE and SIGXFSZ's default action): a kill at an exact point of a write, with no
    chance to clean up, as a SIGKILL would. The signal that ended the child."""
    pid = os.fork()
    if pid == 0:
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            step()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


@pytest.mark.parametrize("what", ["block", "chunk", "model"])
def test_a_kill_in_the_middle_of_a_write_leaves_no_torn_file(tmp_path: Path, what: str) -> None:
    if threading.active_count() > 1:
        pytest.skip("fork with other threads running")
    data = blob(5000, 1)
    a = model_of([data])
    s = uploaded(tmp_path, a, data, upto=None if what == "block" else 4)
    chunks = chunks_of(a, 0, data, 1024)
    other = model_of([blob(10, 2)] * 20)  # a model file of ~4 KB
    step: Callable[[], object] = {
        "block": lambda: s.finish_block(chunks[-1][0]),  # 5000 bytes
        "chunk": lambda: s.put_chunk(*chunks[-1]),  # 904 bytes
        "model": lambda: s.put_model(other),
    }[what]
    target = {
        "block": s.block_path(sha(data)),
        "chunk": tmp_path / "partial" / sha(data) / "00004.part",
        "model": tmp_path / "models" / f"{other.model_id}.json",
    }[what]
    assert _killed_while_writing(step, 512) == signal.SIGXFSZ
    assert tmp_files(tmp_path) != []  # it died mid-write, leaving its temporary file ...
    assert not target.exists()  # ... and nothing at the file's name
    again = BlockStore(tmp_path)
    assert tmp_files(tmp_path) == [] and not again.has_block(sha(data))
    assert again.missing_chunks(sha(data)) == ([] if what == "block" else [4])
    assert again.model(other.model_id) is None


# a real full file system -----------------------------------------------------------------------
def _ok(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def _can_mount_tmpfs(d: Path) -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("unshare") is not None
        and _ok([*UNSHARE, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)])
    )


def full_disk_scenario(mount_point: str) -> dict[str, Any]:
    """Run in a mount namespace of its own (``unshare --mount``): a 96 KiB tmpfs fills up
    under a 160 KiB upload, then grows (remount) so the upload resumes."""

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", mount_point], check=True)

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", mount_point], check=True)
    root = Path(mount_point) / "store"
    data = blob(160 * 1024, 7)
    a = model_of([data])
    s = BlockStore(root)
    s.put_model(a)
    chunks = chunks_of(a, 0, data, 16 * 1024)
    out: dict[str, Any] = {}

    def error(e: StoreError) -> dict[str, Any]:
        return {"code": e.code.value, "message": str(e), "definitive": e.definitive}

    def received_intact() -> bool:
        d = root / "partial" / sha(data)
        got = set(range(len(chunks))) - set(s.missing_chunks(sha(data)) or [])
        return all((d / f"{i:05d}.part").read_bytes() == chunks[i][1] for i in got)

    for h, body in chunks:  # 1: the disk fills up under the chunks
        try:
            s.put_chunk(h, body, finish=False)
        except StoreError as e:
            out["chunk"] = {**error(e), "at": h.chunk}
            break
    out["chunk_tmp"] = tmp_files(root)
    out["chunk_missing"] = s.missing_chunks(sha(data))
    out["chunk_intact"] = received_intact()
    remount("256k")  # 2: every chunk fits, the block itself does not
    for i in s.missing_chunks(sha(data)) or []:
        out["all_chunks"] = s.put_chunk(*chunks[i], finish=False)
    h = chunks[-1][0]
    assembled = s.check_block(h)
    try:
        s.commit_block(h, assembled)
    except StoreError as e:
        out["block"] = error(e)
    out["block_tmp"] = tmp_files(root)
    out["block_stored"] = s.has_block(sha(data))
    out["block_missing"] = s.missing_chunks(sha(data))
    out["block_missing_after_restart"] = BlockStore(root).missing_chunks(sha(data))
    out["block_intact"] = received_intact()
    remount("1m")  # 3: space is back: the retry stores it
    out["retry"] = s.commit_block(h, assembled)
    out["retry_file"] = s.block_path(sha(data)).read_bytes() == data
    out["retry_partial_left"] = (root / "partial" / sha(data)).exists()
    filler = Path(mount_point) / "filler"  # 4: an announce on a full disk
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    other = model_of([blob(100, 8)], name="other")
    try:
        s.put_model(other)
    except StoreError as e:
        out["model"] = error(e)
    out["model_tmp"] = tmp_files(root)
    out["model_known"] = s.model(other.model_id) is not None
    filler.unlink()
    s.put_model(other)
    out["model_retry"] = BlockStore(root).model(other.model_id) == other
    return out


def test_a_full_file_system_is_store_failed_and_the_upload_resumes(tmp_path: Path) -> None:
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    if not _can_mount_tmpfs(mount_point):
        pytest.skip("needs root and unshare --mount (a tmpfs of our own)")
    code = (
        "import json, sys\n"
        "from tests.edge_agent.test_store_faults import full_disk_scenario\n"
        "print(json.dumps(full_disk_scenario(sys.argv[1])))\n"
    )
    p = subprocess.run(
        [*UNSHARE, sys.executable, "-c", code, str(mount_point)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    full = {"code": "store_failed", "definitive": False}
    # 1: chunk 5 of 10 does not fit: refused, nothing half-written, the rest kept
    assert out["chunk"].items() >= full.items() and "No space left" in out["chunk"]["message"]
    assert out["chunk_tmp"] == [] and out["chunk_intact"]
    assert out["chunk_missing"] == list(range(out["chunk"]["at"], 10)) and out["chunk"]["at"] > 0
    # 2: the chunks are all there, the block does not fit: kept for a retry, also on disk
    assert out["all_chunks"] is True
    assert out["block"].items() >= full.items() and "No space left" in out["block"]["message"]
    assert out["block_tmp"] == [] and out["block_intact"] and not out["block_stored"]
    assert out["block_missing"] == [] and out["block_missing_after_restart"] == []
    # 3: space back: stored, whole, and its chunks gone
    assert out["retry"] is True and out["retry_file"] and not out["retry_partial_left"]
    # 4: an announce on a full disk
    assert out["model"].items() >= full.items() and out["model_tmp"] == []
    assert not out["model_known"] and out["model_retry"]


# SIGKILL at random points ---------------------------------------------------------------------
N_BLOCKS = 12
CHUNK = 64 * 1024
DATA = [blob(700_000 + 7919 * k, 100 + k) for k in range(N_BLOCKS)]
KILL_MODEL = model_of(DATA)


def _store_blocks(root: Path, fd: int) -> None:
    """The child: stores every block of KILL_MODEL as the edge does (chunks, then check and
    commit), resuming what is there; reports each chunk and block once it is stored."""
    s = BlockStore(root)
    s.put_model(KILL_MODEL)
    for k, data in enumerate(DATA):
        if s.has_block(sha(data)):
            continue
        chunks = chunks_of(KILL_MODEL, k, data, CHUNK)
        missing = s.missing_chunks(sha(data))
        for i in range(len(chunks)) if missing is None else missing:
            s.put_chunk(*chunks[i], finish=False)
            os.write(fd, f"c {k} {i}\n".encode())
        h = chunks[-1][0]
        s.commit_block(h, s.check_block(h))
        os.write(fd, f"b {k}\n".encode())
    os.write(fd, b"done\n")


def _run_child(root: Path, kill_after: int | None, delay_s: float = 0.0) -> list[str]:
    """Fork a child storing blocks; SIGKILL it ``delay_s`` after it reported ``kill_after``
    events (None: let it finish). The events it reported before it died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            _store_blocks(root, w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    got = b""
    with os.fdopen(r, "rb", buffering=0) as f:
        while kill_after is None or got.count(b"\n") < kill_after:
            more = f.read(4096)
            if not more:
                break
            got += more
        if kill_after is not None:
            # a random instant past the event: the kill lands anywhere in what follows (in a
            # chunk's write, the block's check, its write, fsync or rename); no outcome
            # depends on it
            time.sleep(delay_s)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        got += f.read()  # what it wrote before the kill
    if kill_after is None:
        assert os.waitstatus_to_exitcode(status) == 0
    return got.decode().splitlines()


def _check_store(root: Path, acked: set[tuple[int, int]], committed: set[int]) -> BlockStore:
    """Reopened: every block whole and verified or absent, every partial upload's chunks on
    disk with their bytes, nothing stored lost, no temporary file left."""
    s = BlockStore(root)
    assert tmp_files(root) == []
    for k, data in enumerate(DATA):
        path = s.block_path(sha(data))
        if s.has_block(sha(data)):
            assert path.read_bytes() == data
            assert s.missing_chunks(sha(data)) is None
            continue
        assert not path.exists() and k not in committed
        chunks = chunks_of(KILL_MODEL, k, data, CHUNK)
        missing = s.missing_chunks(sha(data))
        if missing is None:  # no partial upload (yet)
            missing = list(range(len(chunks)))
        for i, (_, body) in enumerate(chunks):
            part = root / "partial" / sha(data) / f"{i:05d}.part"
            if i not in missing:
                assert part.read_bytes() == body
            assert (k, i) not in acked or i not in missing, f"chunk {i} of block {k} lost"
    return s


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_random_points_loses_nothing(tmp_path: Path) -> None:
    """20 kills, each at a random point; after each the reopened store is checked. A store
    that got complete in between is checked whole and replaced by an empty one."""
    if threading.active_count() > 1:
        pytest.skip("fork with other threads running")
    rng = random.Random(13)
    stores = 0
    acked: set[tuple[int, int]] = set()
    committed: set[int] = set()
    kills = 0
    for _ in range(100):  # bounded; 20 kills take ~20-30 rounds
        root = tmp_path / str(stores)
        events = _run_child(root, rng.randint(1, 5), rng.uniform(0, 0.003))
        for e in events:
            kind, *nums = e.split()
            if kind == "c":
                acked.add((int(nums[0]), int(nums[1])))
            elif kind == "b":
                committed.add(int(nums[0]))
        s = _check_store(root, acked, committed)
        if "done" in events:  # the child finished before the kill: start over
            assert all(s.has_block(sha(d)) for d in DATA) and s.usage().partials == 0
            stores, acked, committed = stores + 1, set(), set()
            continue
        kills += 1
        if kills == 20:
            break
    assert kills == 20
    assert "done" in _run_child(root, None)  # it completes from what was kept
    s = _check_store(root, acked, committed)
    assert all(s.has_block(sha(d)) for d in DATA) and s.usage().partials == 0
