"""The edge's content-addressed block store, on disk, surviving restarts and crashes.

    root/blocks/<sha256>.onnx        complete blocks (digest checked, screened)
    root/blocks/<sha256>.owner       the device charged for it (its first uploader)
    root/partial/<sha256>/meta.json  an upload in progress (chunking, uploader), and one file
                                     per received chunk (<index>.part)
    root/models/<model_id>.json      model chains announced by devices
    root/models/<model_id>.devices   the devices that announced it (JSON list; edge-to-edge
                                     transfers are only for a model its device announced)
    root/use.json                    when each model was last used (eviction order; written
                                     lazily, by ``expire_partials``)

A block any device uploaded before is never uploaded again; an interrupted upload resumes from
its missing chunks.

The directory is read once, when the store is opened: from then on an in-memory index (the
stored blocks and their sizes, the announced models, each partial upload's chunking and
received chunks, every device's usage) answers every question, so a chunk costs its own write
and nothing more, and the edge's loop can ask what is stored without touching the disk.

Limits (``StoreLimits``, README "Hardening"). A chunk is taken only for a block of a model its
device announced, with the announced digest and size, in at most ``max_chunks`` chunks. A
device is charged for the blocks it uploaded first (a block later used by other devices' models
stays charged to that first uploader alone: the bytes exist once, and no device pays for what
another chose to upload) and for its partial uploads, each reserved at its declared size from
its first chunk; past ``device_max_bytes`` it is refused with ``quota``, as is an announce past
``device_max_models``. The store as a whole (blocks, reserved partial uploads, model files) is
kept within ``store_max_bytes`` by evicting blocks: first those no announced model needs, then
those of the models used longest ago, never one ``in_use``; when that is not enough, ``quota``.
A partial upload without a chunk for ``partial_expiry_s`` is dropped (``expire_partials``, and
at open).

Faults. Every write goes to a temporary file, is fsynced, renamed into place and its directory
fsynced, so a kill (or a power cut) leaves a file complete or absent; a failed write removes its
temporary file and raises ``StoreError(STORE_FAILED)`` with the partial upload kept for a retry.
A partial upload is removed only once its block is durably written. Chunk files are the one
exception to the fsync (one fsync per 256 KiB chunk would cost ~10x the write): a kill cannot
tear them (written, then renamed), a power cut might, and the open drops a chunk of the wrong
size while the digest check at the end refuses any other damage. At open every block's sha256
is checked again (a damaged block is removed and logged) and temporary files left by a kill are
deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path

from iotoffload.ids import is_id
from iotoffload.model.block_codec import ENCODINGS, CodecError, Encoding, decode
from iotoffload.model.manifest import compute_model_id
from iotoffload.transport.frame import Announce, ErrorCode, ProtocolError, UploadChunk

log = logging.getLogger(__name__)

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_SUFFIX = ".part"
_TMP_MARK = ".tmp-"


class StoreError(ProtocolError):
    """The store refused a chunk, block or model (the code goes back in the error frame)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)

    @property
    def definitive(self) -> bool:
        """The partial upload can never complete as it is (wrong bytes, refused block, lost
        chunks): drop it. ``STORE_FAILED`` (an I/O error: disk full) keeps it for a retry."""
        return self.code is not ErrorCode.STORE_FAILED


@dataclass(frozen=True)
class StoreLimits:
    """The store's limits (defaults: ``EdgeConfig``'s; README "Hardening")."""

    store_max_bytes: int = 20 * 1024**3  # blocks, reserved partial uploads and model files
    device_max_bytes: int = 4 * 1024**3  # blocks a device uploaded first, and its partials
    device_max_models: int = 32  # models a device announced
    max_chunks: int = 4096  # chunks per block
    partial_expiry_s: float = 3600.0  # a partial upload without a chunk this long is dropped


@dataclass(frozen=True)
class StoreUsage:
    """What the store holds (from memory: cheap enough for every status)."""

    blocks: int
    bytes: int  # of the stored blocks
    partials: int
    partial_bytes: int  # reserved: the declared sizes of the partial uploads
    models: int
    total_bytes: int  # what ``store_max_bytes`` bounds: blocks, partials, model files
    evicted: int  # blocks evicted since open
    expired: int  # partial uploads expired since open (and at open)
    corrupt: int  # damaged blocks removed at open


# pure logic: eviction order ---------------------------------------------------------------
def block_last_use(
    models: Mapping[str, Iterable[str]], use: Mapping[str, float]
) -> dict[str, float]:
    """The last use of each block that an announced model needs: the latest use of the
    models holding it (``models``: model id -> its blocks' digests)."""
    out: dict[str, float] = {}
    for model_id, digests in models.items():
        t = use.get(model_id, 0.0)
        for sha in digests:
            if t > out.get(sha, -math.inf):
                out[sha] = t
    return out


def plan_eviction(
    sizes: Mapping[str, int], last_use: Mapping[str, float], keep: Set[str], need: int
) -> list[str] | None:
    """The blocks to evict to free ``need`` bytes: first those no model needs (absent from
    ``last_use``), then the least recently used, never one in ``keep``; ties in digest order
    (deterministic). None when every block that may go frees less than ``need``."""
    if need <= 0:
        return []
    order = sorted(
        (sha for sha in sizes if sha not in keep),
        key=lambda sha: (last_use.get(sha, -math.inf), sha),
    )
    out: list[str] = []
    freed = 0
    for sha in order:
        if freed >= need:
            break
        out.append(sha)
        freed += sizes[sha]
    return out if freed >= need else None


# I/O helpers --------------------------------------------------------------------------------
def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``path`` whole or not at all: a temporary file, fsynced, renamed, its directory
    fsynced (chunk files are not fsynced: see the module docstring). The temporary file is
    removed when anything fails (ENOSPC comes from the write, the flush or the close)."""
    durable = path.suffix != _CHUNK_SUFFIX
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _io_failed(what: str, e: OSError) -> StoreError:
    return StoreError(ErrorCode.STORE_FAILED, f"{what}: {e.strerror or e}")


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _remove_tmp_files(d: Path) -> int:
    n = 0
    with contextlib.suppress(OSError), os.scandir(d) as it:
        for e in it:
            if _is_tmp(e.name):
                with contextlib.suppress(OSError):
                    Path(e.path).unlink()
                    n += 1
    return n


def _sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# the index ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Chunking:
    """How an upload cuts its block: ``chunks`` of ``chunk_size`` over ``stream_bytes`` of
    ``encoding`` (identity: the block's ``block_bytes`` themselves). Another chunking or
    encoding of the same block is another upload: its chunks do not fit this one's."""

    block_bytes: int  # decoded: what the store keeps (and reserves room for)
    chunks: int
    chunk_size: int
    encoding: Encoding = "identity"
    stream_bytes: int = 0  # 0: identity, the chunks cut block_bytes

    @classmethod
    def of(cls, h: UploadChunk) -> _Chunking:
        return cls(h.block_bytes, h.chunks, h.chunk_size, h.encoding, h.stream_bytes or 0)

    @property
    def wire_bytes(self) -> int:
        return self.stream_bytes or self.block_bytes

    @property
    def consistent(self) -> bool:
        encoded = self.encoding != "identity"
        return (
            self.block_bytes >= 1
            and self.chunk_size >= 1
            and self.encoding in ENCODINGS
            and encoded == (self.stream_bytes > 0)
            and self.stream_bytes <= self.block_bytes
            and -(-self.wire_bytes // self.chunk_size) == self.chunks
        )

    def size_of(self, i: int) -> int:
        return min(self.chunk_size, self.wire_bytes - i * self.chunk_size)


@dataclass(frozen=True)
class PartialUpload:
    """What a device needs to resume an upload (``Inventory.partial*``)."""

    missing: list[int]
    chunk_size: int
    encoding: Encoding


@dataclass
class _Partial:
    """One upload in progress (part of the store's index: guarded by its lock)."""

    chunking: _Chunking
    device: str  # charged for its reserved bytes ("" when unknown: an older store)
    last: float  # when its last chunk arrived (the store's clock)
    received: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Block:
    size: int
    owner: str  # the device charged ("": nobody, e.g. a block of an older store)


def _part_name(i: int) -> str:
    return f"{i:05d}{_CHUNK_SUFFIX}"


class BlockStore:
    """Owned by one writer thread (the edge's ``edge-store`` thread; a test's own thread):
    ``put_chunk``, ``finish_block``, ``commit_block``, ``discard_partial``, ``put_model``,
    ``remove_block`` and ``expire_partials`` write, one at a time. The read methods
    (``has_block``, ``missing_chunks``, ``model``, ``usage``, ...), ``touch`` and
    ``check_block`` may be called from any thread: they read the in-memory index, which a lock
    guards for memory operations only (it is never held across I/O).

    ``in_use``: the digests the edge has loaded or queued (never evicted); called on the
    writer thread, only when something must be evicted. ``clock``: wall time (partial
    uploads' last chunk, models' last use; compared with file times at open)."""

    def __init__(
        self,
        root: Path,
        *,
        max_block_bytes: int = 64 * 1024 * 1024,
        screen: Callable[[bytes], object] | None = None,
        limits: StoreLimits | None = None,
        in_use: Callable[[], Set[str]] = frozenset,
        clock: Callable[[], float] = time.time,
        admit: Callable[[Announce], bool] = lambda a: True,
    ) -> None:
        self.root = Path(root)
        self.max_block_bytes = max_block_bytes
        self.limits = limits if limits is not None else StoreLimits()
        self._admit = admit  # which stored models are indexed at open (signed models)
        self._screen = screen
        self._in_use = in_use
        self._clock = clock
        self._lock = threading.Lock()  # the index below: memory operations only
        self._blocks: dict[str, _Block] = {}
        self._models: dict[str, Announce] = {}  # parsed once: a model id names one chain
        self._announcers: dict[str, frozenset[str]] = {}  # model id -> devices (persisted)
        self._device_models: dict[str, set[str]] = {}  # device -> models it announced
        self._partials: dict[str, _Partial] = {}
        self._charged: dict[str, int] = {}  # device -> bytes (blocks it owns, its partials)
        self._total = 0  # blocks + reserved partial bytes + model files
        self._use: dict[str, float] = {}  # model id -> last use (``touch``)
        self._use_dirty = False
        self._evicted = 0
        self._expired = 0
        self._corrupt = 0
        for sub in ("blocks", "partial", "models"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._load_index()

    # opening -------------------------------------------------------------------------------
    def _load_index(self) -> None:
        """Read the directory once (at open: a restart resumes from here). Removes what a kill
        left behind (temporary files, a block that fails its digest, a chunk of the wrong
        size) and the partial uploads past their expiry."""
        for d in (self.root, self.root / "blocks", self.root / "models"):
            _remove_tmp_files(d)
        self._load_blocks()
        self._load_models()
        now = self._clock()
        for d in (self.root / "partial").iterdir():
            ok = d.is_dir() and _SHA_RE.match(d.name) is not None and d.name not in self._blocks
            partial = self._read_partial(d, now) if ok else None
            if partial is None:  # finished already, unreadable, or expired: nothing to resume
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        d.unlink()
            else:
                self._partials[d.name] = partial
                self._charge(partial.device, partial.chunking.block_bytes)

    def _load_blocks(self) -> None:
        blocks = self.root / "blocks"
        owners: set[str] = set()
        for p in blocks.iterdir():
            if p.suffix == ".owner":
                owners.add(p.stem)
            if p.suffix != ".onnx" or not _SHA_RE.match(p.stem):
                continue
            try:
                size = p.stat().st_size
                damage = None if _sha256_of(p) == p.stem else "fails its sha256 check"
            except OSError as e:
                damage = f"is unreadable ({e.strerror or e})"
            if damage:  # torn or damaged (a kill cannot do it; a power cut or a disk can)
                log.warning("block %s %s: removed", p.name, damage)
                with contextlib.suppress(OSError):
                    p.unlink()
                self._corrupt += 1
                continue
            owner = self._read_owner(p.with_suffix(".owner"))
            self._blocks[p.stem] = _Block(size, owner)
            self._charge(owner, size)
        for sha in owners - self._blocks.keys():  # the owner was written, the block was not
            with contextlib.suppress(OSError):
                (blocks / f"{sha}.owner").unlink()

    @staticmethod
    def _read_owner(path: Path) -> str:
        try:
            owner = path.read_text().strip()
        except (OSError, ValueError):
            return ""
        return owner if is_id(owner) else ""

    def _load_models(self) -> None:
        mtimes: dict[str, float] = {}
        for p in (self.root / "models").glob("*.json"):
            try:
                raw = p.read_bytes()
                mtime = p.stat().st_mtime
                a = Announce.model_validate_json(raw)
            except (OSError, ValueError):
                log.warning("ignoring unreadable model file %s", p)
                continue
            if a.model_id != p.stem:
                continue
            if not self._admit(a):  # e.g. unsigned, and the edge now requires signatures
                log.warning(
                    "not serving stored model %s…: refused by the edge's policy", p.stem[:12]
                )
                continue
            self._models[a.model_id] = a
            self._total += len(raw)
            devices = self._read_announcers(p.with_suffix(".devices"))
            self._announcers[a.model_id] = devices
            for d in devices:
                self._device_models.setdefault(d, set()).add(a.model_id)
            mtimes[a.model_id] = mtime
        saved = self._read_use(self.root / "use.json")
        # a model never used since it was announced counts as used when announced
        self._use = {m: saved.get(m, mtimes[m]) for m in self._models}

    @staticmethod
    def _read_use(path: Path) -> dict[str, float]:
        try:
            got = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(got, dict):
            return {}
        return {
            m: float(t)
            for m, t in got.items()
            if isinstance(m, str) and isinstance(t, int | float) and math.isfinite(t)
        }

    def _read_partial(self, d: Path, now: float) -> _Partial | None:
        try:
            last = d.stat().st_mtime  # every chunk's rename touches the directory (first:
        except OSError:  # removing the leftovers below touches it too)
            return None
        removed = _remove_tmp_files(d)
        try:
            meta = json.loads((d / "meta.json").read_text())
            chunking = _Chunking(
                int(meta["block_bytes"]),
                int(meta["chunks"]),
                int(meta["chunk_size"]),
                meta.get("encoding", "identity"),  # an older store's: identity
                int(meta.get("stream_bytes", 0)),
            )
            device = meta.get("device", "")
            entries = [(e.name, e.stat().st_size) for e in os.scandir(d)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None
        if not chunking.consistent or chunking.chunks > self.limits.max_chunks:
            return None
        if not isinstance(device, str) or not is_id(device):
            device = ""
        if now - last >= self.limits.partial_expiry_s:
            self._expired += 1
            return None
        received = set()
        for name, size in entries:
            stem, dot, ext = name.partition(".")
            if not (dot and "." + ext == _CHUNK_SUFFIX and stem.isdigit()):
                continue
            i = int(stem)
            if i < chunking.chunks and size == chunking.size_of(i):
                received.add(i)
            else:  # torn by a power cut: received again
                with contextlib.suppress(OSError):
                    (d / name).unlink()
                removed += 1
        if removed:
            log.info("partial upload %s…: %d leftover files removed", d.name[:12], removed)
        return _Partial(chunking, device, last, received)

    # accounting (memory; callers hold the lock or own the store before it is shared) ---------
    def _charge(self, device: str, n: int) -> None:
        self._total += n
        if device:
            left = self._charged.get(device, 0) + n
            if left:
                self._charged[device] = left
            else:
                del self._charged[device]

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

    def partial_upload(self, sha: str) -> PartialUpload | None:
        """A partial upload's missing chunks, chunk size and encoding (one snapshot), or None
        when there is none."""
        with self._lock:
            p = self._partials.get(sha)
            if p is None:
                return None
            missing = [i for i in range(p.chunking.chunks) if i not in p.received]
            return PartialUpload(missing, p.chunking.chunk_size, p.chunking.encoding)

    def missing_chunks(self, sha: str) -> list[int] | None:
        """Chunks still missing of a partial upload, or None when there is none."""
        p = self.partial_upload(sha)
        return None if p is None else p.missing

    def usage(self) -> StoreUsage:
        with self._lock:
            partial_bytes = sum(p.chunking.block_bytes for p in self._partials.values())
            return StoreUsage(
                blocks=len(self._blocks),
                bytes=sum(b.size for b in self._blocks.values()),
                partials=len(self._partials),
                partial_bytes=partial_bytes,
                models=len(self._models),
                total_bytes=self._total,
                evicted=self._evicted,
                expired=self._expired,
                corrupt=self._corrupt,
            )

    def device_usage(self, device: str) -> tuple[int, int]:
        """(bytes charged, models announced) of one device."""
        with self._lock:
            return self._charged.get(device, 0), len(self._device_models.get(device, ()))

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
        if h.encoding != "identity":
            try:  # never more than the announced block_bytes come out (max_block_bytes-capped)
                blob = decode(blob, h.encoding, h.block_bytes)
            except CodecError as e:
                raise StoreError(
                    ErrorCode.BAD_ENCODING, f"block {h.block}: {h.encoding} upload: {e}"
                ) from e
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
    def _check_chunk(self, h: UploadChunk) -> None:
        """A chunk names a block its device announced, with the announced digest and size."""
        if h.chunks > self.limits.max_chunks:
            raise StoreError(
                ErrorCode.INVALID_CHUNK,
                f"block {h.block} in {h.chunks} chunks: at most {self.limits.max_chunks} "
                "(max_chunks)",
            )
        with self._lock:
            a = self._models.get(h.model_id)
            announced = h.device in self._announcers.get(h.model_id, frozenset())
        if a is None or not announced:
            raise StoreError(
                ErrorCode.UNKNOWN_MODEL,
                f"model {h.model_id[:12]}… is not announced by {h.device}: announce it first",
            )
        if h.block >= len(a.blocks):
            raise StoreError(
                ErrorCode.INVALID_CHUNK, f"block {h.block} outside the model's {len(a.blocks)}"
            )
        b = a.blocks[h.block]
        if b.onnx_sha256 != h.block_sha256 or b.onnx_bytes != h.block_bytes:
            raise StoreError(
                ErrorCode.INVALID_CHUNK,
                f"block {h.block} is not the announced one (sha256 {b.onnx_sha256[:12]}…, "
                f"{b.onnx_bytes} bytes)",
            )

    def put_chunk(self, h: UploadChunk, data: bytes | memoryview, *, finish: bool = True) -> bool:
        """Store one chunk; True when this completed the block (digest and screening passed).
        With ``finish=False``, True means every chunk is here and the rest (``check_block``:
        heavy for a big block, then ``commit_block``) is left to the caller."""
        self._check_chunk(h)
        sha = h.block_sha256
        if self.has_block(sha):
            return True
        if h.block_bytes > self.max_block_bytes:
            raise StoreError(
                ErrorCode.TOO_LARGE,
                f"block of {h.block_bytes} bytes exceeds {self.max_block_bytes}",
            )
        chunking = _Chunking.of(h)
        if h.chunk >= h.chunks or not chunking.consistent:
            raise StoreError(
                ErrorCode.INVALID_CHUNK, f"chunk {h.chunk}/{h.chunks} does not fit the block"
            )
        expected = chunking.size_of(h.chunk)
        if len(data) != expected:
            raise StoreError(
                ErrorCode.SIZE_MISMATCH,
                f"chunk {h.chunk} has {len(data)} bytes, expected {expected}",
            )
        with self._lock:
            p = self._partials.get(sha)
        if p is None or p.chunking != chunking:  # a new upload, or another chunking: restart
            p = self._start_partial(h, chunking, p)
        try:
            _atomic_write(self._partial_dir(sha) / _part_name(h.chunk), data)
        except OSError as e:
            raise _io_failed(f"block {h.block} chunk {h.chunk}", e) from e
        with self._lock:
            p.received.add(h.chunk)
            p.last = self._clock()
            complete = len(p.received) == chunking.chunks
        if not complete:
            return False
        if finish:
            self.finish_block(h)
        return True

    def _start_partial(self, h: UploadChunk, chunking: _Chunking, old: _Partial | None) -> _Partial:
        """Reserve the block's declared size (device quota, then room in the store) and set up
        its directory; an upload of another chunking it replaces frees its reservation."""
        sha = h.block_sha256
        if old is not None:
            self._drop_partial(sha, old)
        self._reserve(h.device, chunking.block_bytes, f"block {h.block}", h.model_id)
        d = self._partial_dir(sha)
        meta = {**chunking.__dict__, "device": h.device}
        try:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True, exist_ok=True)
            _atomic_write(d / "meta.json", json.dumps(meta).encode())
        except OSError as e:
            shutil.rmtree(d, ignore_errors=True)
            with self._lock:
                self._charge(h.device, -chunking.block_bytes)
            raise _io_failed(f"block {h.block}: starting its upload", e) from e
        p = _Partial(chunking, h.device, self._clock())
        with self._lock:
            self._partials[sha] = p
        return p

    def _reserve(self, device: str, n: int, what: str, model_id: str) -> None:
        """Charge ``n`` bytes to ``device`` (and the store), evicting blocks when the store
        would overflow; ``quota`` when the device's share or the store cannot take them."""
        lim = self.limits
        with self._lock:
            used = self._charged.get(device, 0)
        if used + n > lim.device_max_bytes:
            raise StoreError(
                ErrorCode.QUOTA,
                f"{what} ({n} bytes): device {device} has {used} bytes stored or reserved, "
                f"device_max_bytes is {lim.device_max_bytes}",
            )
        self._make_room(n, what, model_id)
        with self._lock:
            self._charge(device, n)

    def _make_room(self, n: int, what: str, model_id: str) -> None:
        """Evict blocks until ``n`` more bytes fit in ``store_max_bytes`` (nothing is evicted
        when that cannot be done). The blocks of ``model_id`` (being uploaded or announced)
        stay."""
        cap = self.limits.store_max_bytes
        with self._lock:
            need = self._total + n - cap
            if need <= 0:
                return
            sizes = {sha: b.size for sha, b in self._blocks.items()}
            last = block_last_use(
                {m: [b.onnx_sha256 for b in a.blocks] for m, a in self._models.items()},
                self._use,
            )
            own = self._models.get(model_id)
            total = self._total
        keep = set(self._in_use())
        if own is not None:
            keep.update(b.onnx_sha256 for b in own.blocks)
        plan = plan_eviction(sizes, last, keep, need)
        if plan is None:
            raise StoreError(
                ErrorCode.QUOTA,
                f"{what} ({n} bytes): the store holds {total} bytes, store_max_bytes is {cap}, "
                "and not enough stored blocks may be evicted (in use, or of this model)",
            )
        for sha in plan:
            self._delete_block(sha)
            with self._lock:
                self._evicted += 1
            log.info("evicted block %s… (%d bytes) for %s", sha[:12], sizes[sha], what)

    def _delete_block(self, sha: str) -> bool:
        """Drop a stored block from the index, then from the disk (so no reader is told it is
        there while it goes); put back when the file cannot be removed."""
        with self._lock:
            b = self._blocks.pop(sha, None)
            if b is None:
                return False
            self._charge(b.owner, -b.size)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.block_path(sha).unlink()
        except OSError as e:
            with self._lock:
                self._blocks[sha] = b
                self._charge(b.owner, b.size)
            raise _io_failed(f"removing block {sha[:12]}…", e) from e
        with contextlib.suppress(OSError):
            self.block_path(sha).with_suffix(".owner").unlink(missing_ok=True)
        return True

    def commit_block(self, h: UploadChunk, blob: bytes) -> bool:
        """Store a block ``check_block`` passed, then drop its partial upload (only now, once
        the block is durable: a failed write keeps the chunks for a retry). True when the
        block is new here."""
        sha = h.block_sha256
        if self.has_block(sha):
            return False
        with self._lock:
            p = self._partials.get(sha)
        if p is None:  # expired or removed meanwhile: charged anew
            owner = h.device
            self._reserve(owner, len(blob), f"block {h.block}", h.model_id)
        else:  # its reservation becomes the block's charge
            owner = p.device or h.device
        try:
            if owner:
                _atomic_write(self.block_path(sha).with_suffix(".owner"), owner.encode())
            _atomic_write(self.block_path(sha), blob)
        except OSError as e:
            with contextlib.suppress(OSError):  # a retry writes it again
                self.block_path(sha).with_suffix(".owner").unlink(missing_ok=True)
            if p is None:
                with self._lock:
                    self._charge(owner, -len(blob))
            raise _io_failed(f"block {h.block}", e) from e
        with self._lock:
            # any partial upload of it is moot now (its own, or one restarted meanwhile)
            cur = self._partials.pop(sha, None)
            if cur is not None:
                self._charge(cur.device, -cur.chunking.block_bytes)
            if p is not None:  # else reserved above
                self._charge(owner, len(blob))
            self._blocks[sha] = _Block(len(blob), owner)
        shutil.rmtree(self._partial_dir(sha), ignore_errors=True)
        return True

    def _drop_partial(self, sha: str, p: _Partial) -> None:
        with self._lock:
            if self._partials.get(sha) is not p:
                return
            del self._partials[sha]
            self._charge(p.device, -p.chunking.block_bytes)
        shutil.rmtree(self._partial_dir(sha), ignore_errors=True)

    def discard_partial(self, h: UploadChunk) -> None:
        """Drop a partial upload that can never complete (``StoreError.definitive``); one of
        another chunking, started meanwhile, stays."""
        sha = h.block_sha256
        with self._lock:
            p = self._partials.get(sha)
        if p is not None and p.chunking == _Chunking.of(h):
            self._drop_partial(sha, p)

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

    def remove_block(self, sha: str) -> bool:
        """Delete a stored block (and any partial upload of it), e.g. a quarantined one; the
        models holding it show it not stored. True when there was something to remove."""
        with self._lock:
            p = self._partials.get(sha)
        if p is not None:
            self._drop_partial(sha, p)
        return self._delete_block(sha) or p is not None

    def expire_partials(self) -> int:
        """Drop the partial uploads without a chunk for ``partial_expiry_s`` (freeing their
        reservations), and save the models' last use if it changed (``touch`` is memory
        only). Called periodically on the writer thread; the number dropped."""
        now = self._clock()
        with self._lock:
            old = [
                (sha, p)
                for sha, p in self._partials.items()
                if now - p.last >= self.limits.partial_expiry_s
            ]
        for sha, p in old:
            self._drop_partial(sha, p)
            log.info(
                "partial upload %s… expired (%d bytes freed)", sha[:12], p.chunking.block_bytes
            )
        with self._lock:
            self._expired += len(old)
        self.save_use()
        return len(old)

    # last use (eviction order) -----------------------------------------------------------
    def touch(self, model_id: str) -> None:
        """The model was used now (a query, an announce): memory only (any thread)."""
        t = self._clock()
        with self._lock:
            if model_id in self._models:
                self._use[model_id] = t
                self._use_dirty = True

    def save_use(self) -> None:
        """Write the models' last use when it changed (writer thread; best effort: a lost
        update only changes which block is evicted first)."""
        with self._lock:
            if not self._use_dirty:
                return
            use = dict(self._use)
            self._use_dirty = False
        try:
            _atomic_write(self.root / "use.json", json.dumps(use).encode())
        except OSError as e:
            log.warning("saving the models' last use failed: %s", e.strerror or e)
            with self._lock:
                self._use_dirty = True

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
            mine = len(self._device_models.get(a.device, ()))
        limit = self.limits.device_max_models
        if a.device not in devices and mine >= limit:
            raise StoreError(
                ErrorCode.QUOTA,
                f"device {a.device} has announced {mine} models, device_max_models is {limit}",
            )
        base = self.root / "models" / a.model_id
        raw = a.model_dump_json().encode()
        if not known:
            self._make_room(len(raw), f"model {a.model_id[:12]}…", a.model_id)
        try:
            if not known:
                _atomic_write(base.with_suffix(".json"), raw)
            if a.device not in devices:
                devices = devices | {a.device}
                _atomic_write(base.with_suffix(".devices"), json.dumps(sorted(devices)).encode())
        except OSError as e:
            raise _io_failed(f"model {a.model_id[:12]}…", e) from e
        with self._lock:
            if not known:
                self._models[a.model_id] = a
                self._total += len(raw)
            self._announcers[a.model_id] = devices
            self._device_models.setdefault(a.device, set()).add(a.model_id)
        self.touch(a.model_id)

    @staticmethod
    def _read_announcers(path: Path) -> frozenset[str]:
        try:
            got = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return frozenset()
        if not isinstance(got, list):
            return frozenset()
        return frozenset(d for d in got if isinstance(d, str) and is_id(d))

    def announced_by(self, model_id: str, device: str) -> bool:
        """Whether ``device`` announced the model here (any thread)."""
        with self._lock:
            return device in self._announcers.get(model_id, frozenset())

    def announcers(self, model_id: str) -> frozenset[str]:
        """The devices that announced the model here (any thread)."""
        with self._lock:
            return self._announcers.get(model_id, frozenset())

    def model(self, model_id: str) -> Announce | None:
        """The announced chain (from memory: every query asks)."""
        with self._lock:
            return self._models.get(model_id)

    def model_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._models)
