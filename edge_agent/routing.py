"""Inbound messages of the edge: decoded, validated and dispatched to the store, the loader,
the query queue or the peer transfers they concern; anything else is refused with a typed
error frame.

Owned by the edge's loop: paho's network threads only call the ``on_*_message`` handlers,
which post the payload there and do nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable

from edge_agent.loading import BlockLoader
from edge_agent.peers import PeerTransfers
from edge_agent.queries import QueryQueue
from edge_agent.replies import Replies
from edge_agent.status import StatusReporter
from edge_agent.store import BlockStore, StoreError
from edge_agent.threads import EdgeThreads
from iotoffload.transport.frame import (
    Announce,
    ErrorCode,
    FrameError,
    Header,
    Hello,
    PeerFetch,
    ProtocolError,
    Query,
    Transfer,
    UploadChunk,
    decode,
)
from iotoffload.transport.link import Message


class InboundRouter:
    """Owned by the edge's loop (the ``on_*_message`` handlers run on network threads)."""

    def __init__(
        self,
        store: BlockStore,
        replies: Replies,
        loader: BlockLoader,
        queries: QueryQueue,
        status: StatusReporter,
        peers: PeerTransfers,
        threads: EdgeThreads,
        *,
        max_body: int,
        stopping: Callable[[], bool],
    ) -> None:
        self.store = store
        self._replies = replies
        self._loader = loader
        self._queries = queries
        self._status = status
        self._peers = peers
        self._threads = threads
        self._max_body = max_body
        self._stopping = stopping
        self._announcing: dict[str, asyncio.Future[None]] = {}  # model id -> put_model

    # network threads: hand the message to the loop, nothing else --------------------------
    def on_control_message(self, m: Message) -> None:
        self._threads.post(self._control, m.payload)

    def on_upload_message(self, m: Message) -> None:
        self._threads.post(self._upload, m.payload)

    def on_query_message(self, m: Message) -> None:
        self._threads.post(self._query, m.payload, time.perf_counter())

    # on the loop --------------------------------------------------------------------------
    def _decode(self, payload: bytes) -> tuple[Header, memoryview] | None:
        try:
            return decode(payload, max_body=self._max_body)
        except FrameError as e:
            self._replies.error(e)
            return None

    def _control(self, payload: bytes) -> None:
        if self._stopping() or (d := self._decode(payload)) is None:
            return
        h = d[0]
        if isinstance(h, Announce):
            fut = self._threads.on_store(self.store.put_model, h)
            self._announcing[h.model_id] = fut
            self._threads.spawn(self._announced(h, fut))
        elif isinstance(h, Hello):
            self._after_announce(h.model_id, functools.partial(self._hello, h))
        elif isinstance(h, Transfer):
            self._after_announce(h.model_id, functools.partial(self._transfer, h))
        elif isinstance(h, PeerFetch):
            self._peers.push(h)
        else:
            self._replies.unexpected(h, "control")

    async def _announced(self, h: Announce, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except StoreError as e:
            self._replies.error(ProtocolError(e.code, str(e), device=h.device))
            return
        except OSError as e:
            self._replies.error(ProtocolError(ErrorCode.STORE_FAILED, str(e), device=h.device))
            return
        finally:
            if self._announcing.get(h.model_id) is fut:
                del self._announcing[h.model_id]
        self._replies.reply(h.device, self._loader.inventory(h.model_id))
        self._status.publish()

    def _after_announce(self, model_id: str, fn: Callable[[], None]) -> None:
        """``fn()`` now, or once an Announce of that model being stored is done (a Hello or
        Transfer sent right after it sees the model)."""
        pending = self._announcing.get(model_id)
        if pending is None:
            fn()
            return

        async def later() -> None:
            with contextlib.suppress(Exception):  # answered by _announced
                await asyncio.shield(pending)
            fn()

        self._threads.spawn(later())

    def _hello(self, h: Hello) -> None:
        self._replies.reply(h.device, self._loader.inventory(h.model_id))

    def _transfer(self, h: Transfer) -> None:
        if self.store.model(h.model_id) is None:
            self._replies.error(
                ProtocolError(
                    ErrorCode.UNKNOWN_MODEL,
                    "announce the model before a transfer",
                    device=h.device,
                )
            )
            return
        self._peers.pull(h)

    def _upload(self, payload: bytes) -> None:
        if self._stopping() or (d := self._decode(payload)) is None:
            return
        h, body = d
        if not isinstance(h, UploadChunk):
            self._replies.unexpected(h, "upload")
            return
        self._loader.chunk(h, body)

    def _query(self, payload: bytes, arrived: float) -> None:
        if self._stopping() or (d := self._decode(payload)) is None:
            return
        h, body = d
        if not isinstance(h, Query):
            self._replies.unexpected(h, "query")
            return
        a = self.store.model(h.model_id)
        ex = self._loader.executor(h.model_id)

        def refuse(code: ErrorCode, message: str) -> None:
            self._replies.error(
                ProtocolError(code, message, request_id=h.request_id, device=h.device)
            )

        if a is None or ex is None:
            refuse(ErrorCode.UNKNOWN_MODEL, f"model {h.model_id[:12]}… is not announced")
            return
        if not 0 <= h.start < h.end <= len(a.blocks):
            refuse(
                ErrorCode.BAD_RANGE,
                f"block range [{h.start}, {h.end}) outside [0, {len(a.blocks)})",
            )
            return
        missing = [
            i for i in range(h.start, h.end) if not self.store.has_block(a.blocks[i].onnx_sha256)
        ]
        if missing:
            refuse(ErrorCode.BLOCKS_MISSING, f"blocks {missing} are not uploaded")
            return
        self._queries.submit(h, body, arrived, ex)
