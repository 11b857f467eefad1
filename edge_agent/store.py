"""The edge's content-addressed block store, on disk, surviving restarts.

    root/blocks/<sha256>.onnx        complete blocks (digest checked, screened)
    root/partial/<sha256>/meta.json  an upload in progress, and one file per received chunk
    root/models/<model_id>.json      model chains announced by devices

A block any device uploaded before is never uploaded again; an interrupted upload resumes from
its missing chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from iotoffload.model.manifest import compute_model_id
from iotoffload.transport.frame import Announce, ErrorCode, ProtocolError, UploadChunk


class StoreError(ProtocolError):
    """The store refused a chunk, block or model (the code goes back in the error frame)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    tmp.replace(path)


class BlockStore:
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
        self._lock = threading.Lock()
        self._models: dict[str, Announce] = {}  # parsed once: a model id names one chain
        for sub in ("blocks", "partial", "models"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # blocks -------------------------------------------------------------------------------
    def block_path(self, sha: str) -> Path:
        return self.root / "blocks" / f"{sha}.onnx"

    def has_block(self, sha: str) -> bool:
        return self.block_path(sha).is_file()

    def block_digests(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "blocks").glob("*.onnx"))

    def missing_chunks(self, sha: str) -> list[int] | None:
        """Chunks still missing of a partial upload, or None when there is none."""
        meta = self._meta(sha)
        if meta is None:
            return None
        d = self.root / "partial" / sha
        return [i for i in range(meta["chunks"]) if not (d / f"{i:05d}.part").is_file()]

    def _meta(self, sha: str) -> dict[str, int] | None:
        try:
            meta: dict[str, int] = json.loads(
                (self.root / "partial" / sha / "meta.json").read_text()
            )
        except (OSError, ValueError):
            return None
        return meta

    def put_chunk(self, h: UploadChunk, data: bytes | memoryview, *, finish: bool = True) -> bool:
        """Store one chunk; True when this completed the block (digest and screening passed).
        With ``finish=False``, True means every chunk is here and ``finish_block`` (digest,
        screening: heavy for a big block) is left to the caller's own thread."""
        sha = h.block_sha256
        if self.has_block(sha):
            return True
        if h.block_bytes > self.max_block_bytes:
            raise StoreError(
                ErrorCode.TOO_LARGE, f"block of {h.block_bytes} bytes exceeds {self.max_block_bytes}"
            )
        if h.chunk >= h.chunks or -(-h.block_bytes // h.chunk_size) != h.chunks:
            raise StoreError(ErrorCode.INVALID_CHUNK, f"chunk {h.chunk}/{h.chunks} does not fit the block")
        expected = min(h.chunk_size, h.block_bytes - h.chunk * h.chunk_size)
        if len(data) != expected:
            raise StoreError(
                ErrorCode.SIZE_MISMATCH, f"chunk {h.chunk} has {len(data)} bytes, expected {expected}"
            )
        meta = {"block_bytes": h.block_bytes, "chunks": h.chunks, "chunk_size": h.chunk_size}
        d = self.root / "partial" / sha
        with self._lock:
            if self._meta(sha) != meta:  # a new upload, or one with another chunking: restart
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                _atomic_write(d / "meta.json", json.dumps(meta).encode())
            _atomic_write(d / f"{h.chunk:05d}.part", bytes(data))
            if any(not (d / f"{i:05d}.part").is_file() for i in range(h.chunks)):
                return False
        if finish:
            self.finish_block(h)
        return True

    def finish_block(self, h: UploadChunk) -> None:
        """Assemble a block whose chunks are all here, check its digest, screen it, store it.
        Raises StoreError (and keeps nothing) when it fails."""
        sha = h.block_sha256
        d = self.root / "partial" / sha
        with self._lock:
            if self.has_block(sha):
                return  # a duplicate last chunk: finished already
            try:
                blob = b"".join((d / f"{i:05d}.part").read_bytes() for i in range(h.chunks))
            except OSError as e:
                raise StoreError(ErrorCode.INVALID_CHUNK, f"block {h.block}: chunks missing") from e
            shutil.rmtree(d, ignore_errors=True)
        if hashlib.sha256(blob).hexdigest() != sha:
            raise StoreError(ErrorCode.DIGEST_MISMATCH, f"block {h.block}: sha256 does not match {sha}")
        if self._screen is not None:
            try:
                self._screen(blob)
            except ValueError as e:
                raise StoreError(ErrorCode.REJECTED_BLOCK, f"block {h.block} refused: {e}") from e
        _atomic_write(self.block_path(sha), blob)

    # models -------------------------------------------------------------------------------
    def put_model(self, a: Announce) -> None:
        if compute_model_id([b.onnx_sha256 for b in a.blocks]) != a.model_id:
            raise StoreError(ErrorCode.INVALID_MODEL, "model_id does not match the announced blocks")
        for i, b in enumerate(a.blocks):
            if i and a.blocks[i - 1].output.shape != b.input.shape:
                raise StoreError(ErrorCode.INVALID_MODEL, f"block {i} input does not follow block {i - 1}")
        path = self.root / "models" / f"{a.model_id}.json"
        if not path.is_file():
            _atomic_write(path, a.model_dump_json().encode())
        self._models[a.model_id] = a

    def model(self, model_id: str) -> Announce | None:
        """The announced chain (read from disk once, then from memory: every query asks)."""
        cached = self._models.get(model_id)
        if cached is not None:
            return cached
        path = self.root / "models" / f"{model_id}.json"
        try:
            a = Announce.model_validate_json(path.read_bytes())
        except (OSError, ValueError):
            return None
        self._models[model_id] = a
        return a

    def model_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "models").glob("*.json"))
