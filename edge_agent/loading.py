"""From an upload chunk to a loaded block: each chunk stored and acked; a completed block
assembled, digest-checked, screened and committed (once, however many last chunks arrive);
its sessions created and its unloaded time profiled. Also what the edge holds (``inventory``).

Owned by the edge's loop; the blocking steps run on ``edge-store`` (every write) and
``edge-loader`` (assembly, checks, screening, sessions, profiling) and come back to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from edge_agent.quarantine import Quarantine
from edge_agent.replies import Replies
from edge_agent.stats import EdgeStats
from edge_agent.store import BlockStore, StoreError
from edge_agent.threads import EdgeThreads
from edge_agent.workers import (
    BlockFaultError,
    BlockRunError,
    Chain,
    RunTimeoutError,
    WorkerProcess,
)
from iotoffload.model.block_codec import Encoding
from iotoffload.runtime.base import BlockFile
from iotoffload.transport.frame import ErrorCode, Inventory, ProtocolError, UploadAck, UploadChunk

log = logging.getLogger(__name__)
MAX_INVENTORY_MISSING = 4096  # chunk indices listed in one inventory (the header has a cap)


def _warmed(chain: Chain, indices: list[int]) -> concurrent.futures.Future[None]:
    """No query workers (a loader on its own): nothing to wait for."""
    f: concurrent.futures.Future[None] = concurrent.futures.Future()
    f.set_result(None)
    return f


def _probe(
    probe: WorkerProcess, chain: Chain, indices: Sequence[int], timeout: float
) -> float | None:
    """On the loader: load a new block in the probe process (its own memory cap and time
    limit) and profile its unloaded time there (median of 3 runs on zeros), the base of the
    load factor devices compute from every reply (LoADPart); then drop the probe's sessions.
    Raises BlockFaultError (quarantine it) or BlockRunError (ONNX Runtime refuses it)."""
    try:
        return probe.load(chain, indices, profile=True, timeout=timeout)
    finally:
        with contextlib.suppress(BlockFaultError, BlockRunError, RunTimeoutError):
            probe.forget(chain.model_id)


class BlockLoader:
    """Owned by the edge's loop: the chains, their loaded blocks, the block profiles, the
    quarantine and the blocks being finished are touched only there. The chains' mapping is
    replaced, never changed, so the network threads may read it (``ready``)."""

    def __init__(
        self,
        edge_id: str,
        store: BlockStore,
        stats: EdgeStats,
        replies: Replies,
        threads: EdgeThreads,
        *,
        quarantine: Quarantine,
        probe: WorkerProcess,
        load_time_limit_s: float,
        publish_status: Callable[[], None],
    ) -> None:
        self.edge_id = edge_id
        self.store = store
        self._stats = stats
        self._replies = replies
        self._threads = threads
        self.quarantine = quarantine
        self.probe = probe  # used on the loader thread only
        self._load_time_limit_s = load_time_limit_s
        self._publish_status = publish_status
        self._chains: Mapping[str, Chain] = {}  # copy on write (``ready``)
        self._loaded: dict[str, set[int]] = {}  # model id -> blocks whose sessions exist
        self._block_ms: dict[str, float] = {}  # sha256 -> unloaded time, ms
        self._in_use: frozenset[str] = frozenset()  # copy on write (``in_use``)
        self._loading: frozenset[str] = frozenset()  # being probed or warmed: copy on write
        # digest -> loads under way (two models may load one block at once): on the loop
        self._loads: dict[str, int] = {}
        self._finishing: dict[str, asyncio.Task[ProtocolError | None]] = {}  # sha256 -> task
        # (model id, sha256) -> its probe and warm-up, shared by every chunk naming the block
        self._serving: dict[tuple[str, str], asyncio.Future[tuple[bool, float | None]]] = {}
        # counts the results the workers sent (which marks their blocks loaded): set by the
        # edge to ``QueryQueue.count``, run before the loaded blocks are read
        self.settle: Callable[[], None] = lambda: None
        # sessions made in every query worker ahead of queries: set to ``QueryQueue.warm``
        self.warm: Callable[[Chain, list[int]], concurrent.futures.Future[None]] = _warmed

    # what the edge holds ------------------------------------------------------------------
    def ready(self, model_id: str) -> Chain | None:
        """The model's chain if it exists already (any thread: a read of the current
        snapshot, never a creation)."""
        return self._chains.get(model_id)

    def chain(self, model_id: str) -> Chain | None:
        """The model's chain, made on first use (on the loop)."""
        ch = self._chains.get(model_id)
        if ch is None:
            a = self.store.model(model_id)
            if a is None:
                return None
            files = tuple(
                BlockFile(self.store.block_path(b.onnx_sha256), b.input, b.output) for b in a.blocks
            )
            ch = Chain(model_id, files, tuple(b.onnx_sha256 for b in a.blocks))
            self._chains = {**self._chains, model_id: ch}
        return ch

    def mark_loaded(self, model_id: str, indices: Iterable[int]) -> None:
        """Blocks whose sessions exist (a query ran them)."""
        have = self._loaded.setdefault(model_id, set())
        new = [i for i in indices if i not in have]
        if not new:
            return
        have.update(new)
        ch = self._chains.get(model_id)
        if ch is not None:
            fresh = {ch.digests[i] for i in new if 0 <= i < len(ch.digests)}
            if not fresh <= self._in_use:
                self._in_use = self._in_use | fresh

    def in_use(self) -> frozenset[str]:
        """Digests of blocks with sessions in the workers, or being loaded: never evicted
        (any thread: the snapshots are replaced, never changed)."""
        return self._in_use | self._loading

    def inventory(self, model_id: str) -> Inventory:
        self.settle()
        a = self.store.model(model_id)
        if a is None:
            return Inventory(model_id=model_id, known=False, edge=self.edge_id)
        stored = [i for i, b in enumerate(a.blocks) if self.store.has_block(b.onnx_sha256)]
        partial: dict[int, list[int]] = {}
        partial_chunk: dict[int, int] = {}
        partial_encoding: dict[int, Encoding] = {}
        listed = 0
        seen: set[str] = set()
        for i, b in enumerate(a.blocks):
            if i in stored or b.onnx_sha256 in seen:  # a digest twice: resumed once
                continue
            p = self.store.partial_upload(b.onnx_sha256)
            if p is None:
                continue
            seen.add(b.onnx_sha256)
            if listed + len(p.missing) > MAX_INVENTORY_MISSING:
                break  # the rest is uploaded whole (a chunk sent twice is harmless)
            partial[i] = p.missing
            partial_chunk[i] = p.chunk_size
            if p.encoding != "identity":
                partial_encoding[i] = p.encoding
            listed += len(p.missing)
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
            partial_chunk_size=partial_chunk,
            partial_encoding=partial_encoding,
            block_ms=block_ms,
            edge=self.edge_id,
            name=a.name[:256],
            blocks=len(a.blocks),
            input=a.blocks[0].input,
            output=a.blocks[-1].output,
        )

    # quarantine ---------------------------------------------------------------------------
    def fault(self, chain: Chain, f: BlockFaultError) -> None:
        """On the loop: a worker reports a block that broke its limits."""
        if f.block is None or not 0 <= f.block < len(chain.digests):
            log.warning("edge %s: a worker failed outside any block: %s", self.edge_id, f)
            return
        self.quarantine_block(chain.digests[f.block], f.kind, str(f))

    def quarantine_block(self, sha: str, kind: str, reason: str) -> None:
        """On the loop: refuse ``sha`` from now on (persisted), drop it from the store, and
        tell every device whose model uses it."""
        if not self.quarantine.add(sha, kind, reason):
            return
        log.warning("edge %s: block %s… quarantined (%s): %s", self.edge_id, sha[:12], kind, reason)
        self._block_ms.pop(sha, None)
        self._in_use = self._in_use - {sha}
        self._threads.spawn(self._forget_block(sha, self.quarantine.snapshot()))
        for model_id in self.store.model_ids():
            a = self.store.model(model_id)
            if a is None:
                continue
            indices = [i for i, b in enumerate(a.blocks) if b.onnx_sha256 == sha]
            if not indices:
                continue
            self._loaded.get(model_id, set()).difference_update(indices)
            for device in sorted(self.store.announcers(model_id)):
                for i in indices:
                    self._replies.error(
                        ProtocolError(
                            ErrorCode.QUARANTINED,
                            f"block {i} quarantined ({kind}): {reason}",
                            device=device,
                            block=i,
                        )
                    )
        self._publish_status()

    async def _forget_block(self, sha: str, snapshot: bytes) -> None:
        try:
            await self._threads.on_store(self.quarantine.save, snapshot)
            await self._threads.on_store(self.store.remove_block, sha)
        except (OSError, StoreError) as e:
            log.error("edge %s: quarantine of %s… not saved: %s", self.edge_id, sha[:12], e)

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
            block_done=False,
            loaded=False,
            edge=self.edge_id,
        )
        # Every chunk is acked once stored, the last one too (before the block is checked
        # and loaded, which its block_done ack waits for): the device's window counts bytes
        # on the link. QoS 0: a chunk ack only opens that window (acks count cumulatively,
        # and a connection lost is resynced from the inventory); at QoS 1 each would cost the
        # device a PUBACK and the broker a stored message.
        replies.reply(h.device, ack, qos=0)
        if not done:
            return
        ack = ack.model_copy(update={"block_done": True})
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
        except ProtocolError as e:  # quarantined: this chunk's sender is told, as every device
            replies.chunk_error(h, e.code, str(e))  # of a model using it is
            return
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
        """A stored block, ready to serve: probed on the loader (a new block: in the probe
        process, within its limits), then its sessions made in every query worker; (loaded,
        the block's unloaded ms). Raises ProtocolError(QUARANTINED) when it broke a limit
        (it is quarantined) or was quarantined before."""
        why = self.quarantine.reason(sha)
        if why is not None:
            raise ProtocolError(ErrorCode.QUARANTINED, f"quarantined: {why}")
        a = self.store.model(model_id)
        ch = self.chain(model_id)
        if a is None or ch is None:
            return False, None
        indices = [i for i, b in enumerate(a.blocks) if b.onnx_sha256 == sha]
        if not indices:
            return False, None
        if self._loaded.get(model_id, set()).issuperset(indices):
            # a chunk of a block served already (a resend after a reconnect, or a stranger's
            # copy): acked from what is known, never probed or warmed again
            return True, self._block_ms.get(sha)
        key = (model_id, sha)
        task = self._serving.get(key)
        if task is None:  # one probe and warm-up per block, however many chunks name it
            task = asyncio.ensure_future(self._serve_once(key, ch, indices))
            self._serving[key] = task
        return await asyncio.shield(task)

    async def _serve_once(
        self, key: tuple[str, str], ch: Chain, indices: list[int]
    ) -> tuple[bool, float | None]:
        model_id, sha = key
        self._loads[sha] = self._loads.get(sha, 0) + 1
        self._loading = self._loading | {sha}
        try:
            return await self._serve_block(model_id, sha, ch, indices)
        finally:
            # the block stays protected from eviction until its last load ends
            if (left := self._loads.pop(sha) - 1) > 0:
                self._loads[sha] = left
            else:
                self._loading = self._loading - {sha}
            self._serving.pop(key, None)

    async def _serve_block(
        self, model_id: str, sha: str, ch: Chain, indices: list[int]
    ) -> tuple[bool, float | None]:
        if sha not in self._block_ms:
            run = functools.partial(_probe, self.probe, ch, indices[:1], self._load_time_limit_s)
            try:
                ms = await self._threads.on_loader(run)
            except BlockFaultError as f:
                if f.block is None:  # the probe failed outside the block: not its doing
                    raise ProtocolError(
                        ErrorCode.INTERNAL, f"the probe failed ({f}); send the chunk again"
                    ) from f
                self.quarantine_block(sha, f.kind, str(f))
                raise ProtocolError(ErrorCode.QUARANTINED, f"quarantined ({f.kind}): {f}") from f
            except RunTimeoutError as e:
                raise ProtocolError(ErrorCode.INTERNAL, f"the probe: {e}") from e
            except BlockRunError as e:
                if e.kind == "input":  # the announcer's spec is not the block's: its error
                    raise ProtocolError(ErrorCode.INVALID_MODEL, str(e)) from e
                # ONNX Runtime cannot load or run it on zeros: refused, not quarantined (no
                # limit was broken); the next chunk naming it is probed again
                raise ProtocolError(ErrorCode.REJECTED_BLOCK, f"ONNX Runtime: {e}") from e
            if ms is not None:
                self._block_ms.setdefault(sha, ms)
        # "loaded" means a query pays no session creation: the ack waits for the workers
        # (a device's first query after its upload would otherwise wait behind the warm-up)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.wrap_future(self.warm(ch, indices)), self._load_time_limit_s
            )
        self.mark_loaded(model_id, indices)
        return True, self._block_ms.get(sha)
