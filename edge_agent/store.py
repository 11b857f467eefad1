"""The edge's content-addressed block store, on disk, surviving restarts.

    root/blocks/<sha256>.onnx        complete blocks (digest checked, screened)
    root/partial/<sha256>/meta.json  an upload in progress, and one file per received chunk
    root/models/<model_id>.json      model chains announced by devices
    root/models/<model_id>.devices   the devices that announced it (JSON list; edge-to-edge
                                     transfers are only for a model its device announced)

A block any device uploaded before is never uploaded again; an interrupted upload resumes from
its missing chunks.

The directory is read once, when the store is opened: from then on an in-memory index (the
stored blocks, the announced models, and for each partial upload its chunking and the set of
chunks received) answers every question, so a chunk costs its own write and nothing more, and
the edge's loop can ask what is stored without touching the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from iotoffload.ids import is_id
from iotoffload.model.manifest import compute_model_id
from iotoffload.transport.frame import Announce, ErrorCode, ProtocolError, UploadChunk

log = logging.getLogger(__name__)


class StoreError(ProtocolError):
    """The store refused a chunk, block or model (the code goes back in the error frame)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)

    @property
    def definitive(self) -> bool:
        """The partial upload can never complete as it is (wrong bytes, refused block, lost
        chunks): drop it. ``STORE_FAILED`` (an I/O error: disk full) keeps it for a retry."""
        return self.code is not ErrorCode.STORE_FAILED


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _io_failed(what: str, e: OSError) -> StoreError:
    return StoreError(ErrorCode.STORE_FAILED, f"{what}: {e.strerror or e}")


@dataclass(frozen=True)
class _Chunking:
    block_bytes: int
    chunks: int
    chunk_size: int

    @classmethod
    def of(cls, h: UploadChunk) -> _Chunking:
        return cls(h.block_bytes, h.chunks, h.chunk_size)


@dataclass
class _Partial:
    """One upload in progress (part of the store's index: guarded by its lock)."""

    chunking: _Chunking
    received: set[int] = field(default_factory=set)


def _part_name(i: int) -> str:
    return f"{i:05d}.part"


class BlockStore:
    """Owned by one writer thread (the edge's ``edge-store`` thread; a test's own thread):
    ``put_chunk``, ``finish_block``, ``commit_block``, ``discard_partial`` and ``put_model``
    write, one at a time. The read methods (``has_block``, ``missing_chunks``, ``model``, ...)
    and ``check_block`` may be called from any thread: they read the in-memory index, which
    a lock guards for memory operations only (it is never held across I/O)."""

    def __init__(
        self,
        root: Path,
        *,
        max_block_bytes: int = 64 * 1024 * 1024,
        screen: Callable[[bytes], object] | None = None,
    ) -> None:
        self.root = Path(root)
        self.max_block_bytes = max_block_bytes
        self._screen = screen
        self._lock = threading.Lock()  # the index below: memory operations only
        self._blocks: set[str] = set()
        self._models: dict[str, Announce] = {}  # parsed once: a model id names one chain
        self._announcers: dict[str, frozenset[str]] = {}  # model id -> devices (persisted)
        self._partials: dict[str, _Partial] = {}
        for sub in ("blocks", "partial", "models"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._load_index()

    def _load_index(self) -> None:
        """Read the directory once (at open: a restart resumes from here)."""
        self._blocks = {p.stem for p in (self.root / "blocks").glob("*.onnx")}
        for p in (self.root / "models").glob("*.json"):
            try:
                a = Announce.model_validate_json(p.read_bytes())
            except (OSError, ValueError):
                log.warning("ignoring unreadable model file %s", p)
                continue
            if a.model_id == p.stem:
                self._models[a.model_id] = a
                self._announcers[a.model_id] = self._read_announcers(p.with_suffix(".devices"))
        for d in (self.root / "partial").iterdir():
            partial = self._read_partial(d) if d.is_dir() and d.name not in self._blocks else None
            if partial is None:  # finished already, or unreadable: nothing to resume
                shutil.rmtree(d, ignore_errors=True)
            else:
                self._partials[d.name] = partial

    @staticmethod
    def _read_partial(d: Path) -> _Partial | None:
        try:
            meta = json.loads((d / "meta.json").read_text())
            chunking = _Chunking(
                int(meta["block_bytes"]), int(meta["chunks"]), int(meta["chunk_size"])
            )
            names = [p.name for p in d.iterdir()]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        received = set()
        for name in names:
            stem, dot, ext = name.partition(".")
            if dot and ext == "part" and stem.isdigit() and int(stem) < chunking.chunks:
                received.add(int(stem))
        return _Partial(chunking, received)

    # blocks: reads (any thread) -------------------------------------------------------------
    def block_path(self, sha: str) -> Path:
        return self.root / "blocks" / f"{sha}.onnx"

    def _partial_dir(self, sha: str) -> Path:
        return self.root / "partial" / sha

    def has_block(self, sha: str) -> bool:
        with self._lock:
            return sha in self._blocks

    def block_digests(self) -> list[str]:
        with self._lock:
            return sorted(self._blocks)

    def missing_chunks(self, sha: str) -> list[int] | None:
        """Chunks still missing of a partial upload, or None when there is none."""
        with self._lock:
            p = self._partials.get(sha)
            if p is None:
                return None
            return [i for i in range(p.chunking.chunks) if i not in p.received]

    def check_block(self, h: UploadChunk) -> bytes:
        """The assembled block, once its digest and screening passed (reads only: a loader
        thread may run it while the writer stores other chunks). Raises StoreError."""
        sha = h.block_sha256
        d = self._partial_dir(sha)
        try:
            blob = b"".join((d / _part_name(i)).read_bytes() for i in range(h.chunks))
        except FileNotFoundError as e:
            raise StoreError(ErrorCode.INVALID_CHUNK, f"block {h.block}: chunks missing") from e
        except OSError as e:
            raise _io_failed(f"block {h.block}: reading its chunks", e) from e
        if hashlib.sha256(blob).hexdigest() != sha:
            raise StoreError(
                ErrorCode.DIGEST_MISMATCH, f"block {h.block}: sha256 does not match {sha}"
            )
        if self._screen is not None:
            try:
                self._screen(blob)
            except ValueError as e:
                raise StoreError(ErrorCode.REJECTED_BLOCK, f"block {h.block} refused: {e}") from e
        return blob

    # blocks: writes (the writer thread) ---------------------------------------------------
    def put_chunk(self, h: UploadChunk, data: bytes | memoryview, *, finish: bool = True) -> bool:
        """Store one chunk; True when this completed the block (digest and screening passed).
        With ``finish=False``, True means every chunk is here and the rest (``check_block``:
        heavy for a big block, then ``commit_block``) is left to the caller."""
        sha = h.block_sha256
        if self.has_block(sha):
            return True
        if h.block_bytes > self.max_block_bytes:
            raise StoreError(
                ErrorCode.TOO_LARGE,
                f"block of {h.block_bytes} bytes exceeds {self.max_block_bytes}",
            )
        if h.chunk >= h.chunks or -(-h.block_bytes // h.chunk_size) != h.chunks:
            raise StoreError(
                ErrorCode.INVALID_CHUNK, f"chunk {h.chunk}/{h.chunks} does not fit the block"
            )
        expected = min(h.chunk_size, h.block_bytes - h.chunk * h.chunk_size)
        if len(data) != expected:
            raise StoreError(
                ErrorCode.SIZE_MISMATCH,
                f"chunk {h.chunk} has {len(data)} bytes, expected {expected}",
            )
        chunking = _Chunking.of(h)
        d = self._partial_dir(sha)
        with self._lock:
            p = self._partials.get(sha)
        try:
            if p is None or p.chunking != chunking:  # a new upload, or another chunking: restart
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True, exist_ok=True)
                _atomic_write(d / "meta.json", json.dumps(chunking.__dict__).encode())
                p = _Partial(chunking)
                with self._lock:
                    self._partials[sha] = p
            _atomic_write(d / _part_name(h.chunk), bytes(data))
        except OSError as e:
            raise _io_failed(f"block {h.block} chunk {h.chunk}", e) from e
        with self._lock:
            p.received.add(h.chunk)
            complete = len(p.received) == chunking.chunks
        if not complete:
            return False
        if finish:
            self.finish_block(h)
        return True

    def commit_block(self, h: UploadChunk, blob: bytes) -> bool:
        """Store a block ``check_block`` passed, then drop its partial upload (only now: a
        failed write keeps the chunks for a retry). True when the block is new here."""
        sha = h.block_sha256
        if self.has_block(sha):
            return False
        try:
            _atomic_write(self.block_path(sha), blob)
        except OSError as e:
            raise _io_failed(f"block {h.block}", e) from e
        with self._lock:
            self._blocks.add(sha)
            self._partials.pop(sha, None)
        shutil.rmtree(self._partial_dir(sha), ignore_errors=True)
        return True

    def discard_partial(self, h: UploadChunk) -> None:
        """Drop a partial upload that can never complete (``StoreError.definitive``); one of
        another chunking, started meanwhile, stays."""
        sha = h.block_sha256
        with self._lock:
            p = self._partials.get(sha)
            if p is None or p.chunking != _Chunking.of(h):
                return
            del self._partials[sha]
        shutil.rmtree(self._partial_dir(sha), ignore_errors=True)

    def finish_block(self, h: UploadChunk) -> bool:
        """Assemble a block whose chunks are all here, check its digest, screen it, store it
        (``check_block`` then ``commit_block`` on this thread). Raises StoreError; a
        definitive failure keeps nothing. True when the block is new here."""
        if self.has_block(h.block_sha256):
            return False  # a duplicate last chunk: finished already
        try:
            blob = self.check_block(h)
        except StoreError as e:
            if e.definitive:
                self.discard_partial(h)
            raise
        return self.commit_block(h, blob)

    # models -------------------------------------------------------------------------------
    def put_model(self, a: Announce) -> None:
        if compute_model_id([b.onnx_sha256 for b in a.blocks]) != a.model_id:
            raise StoreError(
                ErrorCode.INVALID_MODEL, "model_id does not match the announced blocks"
            )
        for i, b in enumerate(a.blocks):
            if i and a.blocks[i - 1].output.shape != b.input.shape:
                raise StoreError(
                    ErrorCode.INVALID_MODEL, f"block {i} input does not follow block {i - 1}"
                )
        with self._lock:
            known = a.model_id in self._models
            devices = self._announcers.get(a.model_id, frozenset())
        base = self.root / "models" / a.model_id
        try:
            if not known:
                _atomic_write(base.with_suffix(".json"), a.model_dump_json().encode())
            if a.device not in devices:
                devices = devices | {a.device}
                _atomic_write(base.with_suffix(".devices"), json.dumps(sorted(devices)).encode())
        except OSError as e:
            raise _io_failed("model", e) from e
        with self._lock:
            self._models.setdefault(a.model_id, a)
            self._announcers[a.model_id] = devices

    @staticmethod
    def _read_announcers(path: Path) -> frozenset[str]:
        try:
            got = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return frozenset()
        if not isinstance(got, list):
            return frozenset()
        return frozenset(d for d in got if is_id(d))

    def announced_by(self, model_id: str, device: str) -> bool:
        """Whether ``device`` announced the model here (any thread)."""
        with self._lock:
            return device in self._announcers.get(model_id, frozenset())

    def model(self, model_id: str) -> Announce | None:
        """The announced chain (from memory: every query asks)."""
        with self._lock:
            return self._models.get(model_id)

    def model_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._models)
