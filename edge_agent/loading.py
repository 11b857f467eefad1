"""From an upload chunk to a loaded block: each chunk stored and acked; a completed block
assembled, digest-checked, screened and committed (once, however many last chunks arrive);
its sessions created and its unloaded time profiled. Also what the edge holds (``inventory``).

Owned by the edge's loop; the blocking steps run on ``edge-store`` (every write) and
``edge-loader`` (assembly, checks, screening, sessions, profiling) and come back to it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from edge_agent.replies import Replies
from edge_agent.stats import EdgeStats
from edge_agent.store import BlockStore, StoreError
from edge_agent.threads import EdgeThreads
from iotoffload.runtime.base import BlockFile
from iotoffload.runtime.onnx import OnnxExecutor
from iotoffload.transport.frame import ErrorCode, Inventory, ProtocolError, UploadAck, UploadChunk

log = logging.getLogger(__name__)


def _load_blocks(ex: OnnxExecutor, indices: list[int], profile: bool) -> float | None:
    """On the loader: create the sessions of a block (at each index it has in the chain) and,
    when asked, its unloaded time (median of 3 runs on zeros), the base of the load factor
    devices compute from every reply (LoADPart)."""
    for i in indices:
        ex.load(i)
    if not profile:
        return None
    i = indices[0]
    b = ex.blocks[i]
    x = np.zeros(b.input.shape, b.input.dtype)
    times = [ex.run_timed(i, i + 1, x)[1][0] for _ in range(3)]
    return float(np.median(times)) * 1e3


class BlockLoader:
    """Owned by the edge's loop: the executors, their loaded blocks, the block profiles and
    the blocks being finished are touched only there. The executors' mapping is replaced,
    never changed, so the network threads may read it (``ready``)."""

    def __init__(
        self,
        edge_id: str,
        store: BlockStore,
        stats: EdgeStats,
        replies: Replies,
        threads: EdgeThreads,
        *,
        session_threads: int,
        publish_status: Callable[[], None],
    ) -> None:
        self.edge_id = edge_id
        self.store = store
        self._stats = stats
        self._replies = replies
        self._threads = threads
        self._session_threads = session_threads  # ONNX Runtime threads per session
        self._publish_status = publish_status
        self._executors: Mapping[str, OnnxExecutor] = {}  # copy on write (``ready``)
        self._loaded: dict[str, set[int]] = {}  # model id -> blocks whose session exists
        self._block_ms: dict[str, float] = {}  # sha256 -> unloaded time, ms
        self._finishing: dict[str, asyncio.Task[ProtocolError | None]] = {}  # sha256 -> task
        # counts the results the workers sent (which marks their blocks loaded): set by the
        # edge to ``QueryQueue.count``, run before the loaded blocks are read
        self.settle: Callable[[], None] = lambda: None

    # what the edge holds ------------------------------------------------------------------
    def ready(self, model_id: str) -> OnnxExecutor | None:
        """The model's executor if it exists already (any thread: a read of the current
        snapshot, never a creation)."""
        return self._executors.get(model_id)

    def executor(self, model_id: str) -> OnnxExecutor | None:
        """The model's executor, made on first use (on the loop)."""
        ex = self._executors.get(model_id)
        if ex is None:
            a = self.store.model(model_id)
            if a is None:
                return None
            files = [
                BlockFile(self.store.block_path(b.onnx_sha256), b.input, b.output) for b in a.blocks
            ]
            ex = OnnxExecutor(files, threads=self._session_threads)  # sessions come later
            self._executors = {**self._executors, model_id: ex}
        return ex

    def mark_loaded(self, model_id: str, indices: Iterable[int]) -> None:
        """Blocks whose sessions exist (a query ran them)."""
        self._loaded.setdefault(model_id, set()).update(indices)

    def inventory(self, model_id: str) -> Inventory:
        self.settle()
        a = self.store.model(model_id)
        if a is None:
            return Inventory(model_id=model_id, known=False, edge=self.edge_id)
        stored = [i for i, b in enumerate(a.blocks) if self.store.has_block(b.onnx_sha256)]
        partial = {}
        for i, b in enumerate(a.blocks):
            missing = self.store.missing_chunks(b.onnx_sha256)
            if missing is not None and i not in stored:
                partial[i] = missing
        block_ms = {
            i: self._block_ms[b.onnx_sha256]
            for i, b in enumerate(a.blocks)
            if b.onnx_sha256 in self._block_ms
        }
        return Inventory(
            model_id=model_id,
            known=True,
            stored=stored,
            loaded=sorted(self._loaded.get(model_id, ())),
            partial=partial,
            block_ms=block_ms,
            edge=self.edge_id,
            name=a.name[:256],
            blocks=len(a.blocks),
            input=a.blocks[0].input,
            output=a.blocks[-1].output,
        )

    # chunks, blocks, sessions -------------------------------------------------------------
    def chunk(self, h: UploadChunk, body: memoryview) -> None:
        """A validated upload chunk: stored on the store thread, then acked."""
        self._stats.chunks += 1
        put = functools.partial(self.store.put_chunk, finish=False)
        self._threads.spawn(self._chunk_stored(h, self._threads.on_store(put, h, body)))

    async def _chunk_stored(self, h: UploadChunk, fut: asyncio.Future[bool]) -> None:
        replies = self._replies
        try:
            done = await fut
        except StoreError as e:
            replies.chunk_error(h, e.code, str(e))
            return
        except OSError as e:  # the store turns these into STORE_FAILED; kept as a backstop
            replies.chunk_error(h, ErrorCode.STORE_FAILED, str(e))
            return
        ack = UploadAck(
            model_id=h.model_id,
            block=h.block,
            chunk=h.chunk,
            block_done=done,
            loaded=False,
            edge=self.edge_id,
        )
        if not done:
            replies.reply(h.device, ack)
            return
        sha = h.block_sha256
        if not self.store.has_block(sha):
            task = self._finishing.get(sha)
            if task is None:  # one finish per block, however many last chunks arrive
                task = self._threads.spawn(self._finish_block(h))
                self._finishing[sha] = task
            failed = await asyncio.shield(task)
            if failed is not None:
                replies.chunk_error(h, failed.code, str(failed))
                return
        try:
            loaded, ms = await self._load(h.model_id, sha)
        except Exception as e:  # the loader lives on; the error names no chunk (mqtt-api.md)
            log.exception("loading block %d of %s… failed", h.block, h.model_id[:12])
            msg = f"block {h.block}: {type(e).__name__}: {e}"
            replies.error(ProtocolError(ErrorCode.INTERNAL, msg, device=h.device))
            return
        replies.reply(h.device, ack.model_copy(update={"loaded": loaded, "block_ms": ms}))
        self._publish_status()

    async def _finish_block(self, h: UploadChunk) -> ProtocolError | None:
        """Assemble, check and screen on the loader; store on the store thread; the partial
        upload goes only once the block is written, or once it can never complete."""
        sha = h.block_sha256
        th = self._threads
        try:
            try:
                blob = await th.on_loader(self.store.check_block, h)
            except StoreError as e:
                if e.definitive:
                    await th.on_store(self.store.discard_partial, h)
                return e
            try:
                fresh = await th.on_store(self.store.commit_block, h, blob)
            except StoreError as e:
                return e
        except OSError as e:
            return ProtocolError(ErrorCode.STORE_FAILED, f"block {h.block}: {e}")
        finally:
            self._finishing.pop(sha, None)
        if fresh:  # counted once per block
            self._stats.blocks_stored += 1
            if h.source:
                self._stats.blocks_from_peers += 1
        return None

    async def _load(self, model_id: str, sha: str) -> tuple[bool, float | None]:
        """Sessions for a stored block in a model's executor (on the loader); (loaded,
        the block's unloaded ms)."""
        a = self.store.model(model_id)
        ex = self.executor(model_id)
        if a is None or ex is None:
            return False, None
        indices = [i for i, b in enumerate(a.blocks) if b.onnx_sha256 == sha]
        if not indices:
            return False, None
        profile = sha not in self._block_ms
        ms = await self._threads.on_loader(_load_blocks, ex, indices, profile)
        if ms is not None:
            self._block_ms.setdefault(sha, ms)
        self.mark_loaded(model_id, indices)
        return True, self._block_ms.get(sha)
