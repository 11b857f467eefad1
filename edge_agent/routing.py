"""Inbound messages of the edge: decoded, validated and dispatched to the store, the loader,
the query queue or the peer transfers they concern; anything else is refused with a typed
error frame.

Every frame's sender is the last level of its topic (protocol v2: on a secured broker the ACL
binds it to the authenticated client); a frame that names another device is refused.

Owned by the edge's loop: paho's network threads call the ``on_*_message`` handlers. The
control and upload handlers post the payload there and do nothing else. The query handler is
the hot path: it decodes and checks the query on the network thread, against what the store's
index and the loader's chains (thread-safe reads) say now, and hands it straight to the
workers; refusals, and a model whose chain is not made yet, go to the loop.
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
from edge_agent.workers import Chain
from iotoffload.transport.frame import (
    MODEL_PAGE,
    Announce,
    ErrorCode,
    FrameError,
    Header,
    Hello,
    ListModels,
    ModelList,
    PeerFetch,
    ProtocolError,
    Query,
    Transfer,
    UploadChunk,
    decode,
)
from iotoffload.transport.link import Message
from iotoffload.transport.topics import Topics


def forged(
    h: Announce | Hello | Transfer | Query | UploadChunk | ListModels, sender: str
) -> ProtocolError:
    """A frame whose ``device`` is not the identity its topic (and the broker) names: refused,
    and the refusal goes to the sender, never to the device it claims to be."""
    return ProtocolError(
        ErrorCode.FORBIDDEN,
        f"{h.type} claims device {h.device!r} but was sent by {sender!r}",
        request_id=getattr(h, "request_id", None),
        device=sender,
    )


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
        topics: Topics,
        *,
        max_body: int,
        stopping: Callable[[], bool],
        check_announce: Callable[[Announce], ProtocolError | None] = lambda a: None,
        max_tensor_bytes: int = 256 * 1024 * 1024,
        saw: Callable[[str], None] = lambda device: None,
    ) -> None:
        # any thread: a device heard from, by a valid query, announce or hello in its own
        # name (peer edges' fetches and pushes, junk and forged frames are not devices)
        self._saw = saw
        self.store = store
        self._replies = replies
        self._loader = loader
        self._queries = queries
        self._status = status
        self._peers = peers
        self._threads = threads
        self._topics = topics
        self._max_body = max_body
        self._stopping = stopping
        self._check_announce = check_announce  # signed models (edge_agent.trust)
        self._max_tensor_bytes = max_tensor_bytes  # what a worker's shared buffer may need
        self._announcing: dict[str, asyncio.Future[None]] = {}  # model id -> put_model

    # network threads: hand the message to the loop, nothing else --------------------------
    def on_control_message(self, m: Message) -> None:
        if (sender := self._topics.sender(m.topic)) is not None:
            self._threads.post(self._control, sender, m.payload)

    def on_upload_message(self, m: Message) -> None:
        if (sender := self._topics.sender(m.topic)) is not None:
            self._threads.post(self._upload, sender, m.payload)

    def on_query_message(self, m: Message) -> None:
        arrived = time.perf_counter()
        if self._stopping():  # a bool the loop sets: no more queries taken
            return
        sender = self._topics.sender(m.topic)
        if sender is None:  # not addressed as the tree says: nobody to answer
            return
        post = self._threads.post
        try:
            h, body = decode(m.payload, max_body=self._max_body)
        except FrameError as e:
            e.device = sender  # answer the identity the broker vouches for, not the header
            post(self._replies.error, e)
            return
        if not isinstance(h, Query):
            post(self._replies.unexpected, h, "query", sender)
            return
        if h.device != sender:
            post(self._replies.error, forged(h, sender))
            return
        self._saw(sender)  # a device, by a valid query in its own name
        checked = self._check_query(h, self._loader.ready(h.model_id))
        if isinstance(checked, ProtocolError):
            post(self._replies.error, checked)
        elif checked is None:  # the model's chain is made on the loop, first
            post(self._query, h, body, arrived)
        else:
            self.store.touch(h.model_id)  # memory only: the eviction order
            self._queries.submit(h, body, arrived, checked)

    # on the loop --------------------------------------------------------------------------
    def _decode(self, sender: str, payload: bytes) -> tuple[Header, memoryview] | None:
        try:
            return decode(payload, max_body=self._max_body)
        except FrameError as e:
            e.device = sender
            self._replies.error(e)
            return None

    def _control(self, sender: str, payload: bytes) -> None:
        if self._stopping() or (d := self._decode(sender, payload)) is None:
            return
        h = d[0]
        if isinstance(h, PeerFetch):  # from a peer edge: checked by the transfers
            self._peers.push(h, sender)
            return
        if isinstance(h, ListModels):
            if h.device != sender:
                self._replies.error(forged(h, sender))
                return
            models = self.store.model_ids()
            page = models[h.offset : h.offset + MODEL_PAGE]
            edge = self._replies.edge_id
            self._replies.reply(
                sender, ModelList(edge=edge, offset=h.offset, total=len(models), models=page)
            )
            return
        if not isinstance(h, Announce | Hello | Transfer):
            self._replies.unexpected(h, "control", sender)
        elif h.device != sender:
            self._replies.error(forged(h, sender))
        elif isinstance(h, Announce):
            self._saw(sender)
            if (refused := self._check_announce(h)) is not None:
                self._replies.error(refused)
                return
            fut = self._threads.on_store(self.store.put_model, h)
            self._announcing[h.model_id] = fut
            self._threads.spawn(self._announced(h, fut))
        elif isinstance(h, Hello):
            self._saw(sender)
            self._after_announce(h.model_id, functools.partial(self._hello, h))
        else:
            self._after_announce(h.model_id, functools.partial(self._transfer, h))

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
        if not self.store.announced_by(h.model_id, h.device):
            self._replies.error(
                ProtocolError(
                    ErrorCode.UNKNOWN_MODEL,
                    "announce the model (from this device) before a transfer",
                    device=h.device,
                )
            )
            return
        self._peers.pull(h)

    def _upload(self, sender: str, payload: bytes) -> None:
        if self._stopping() or (d := self._decode(sender, payload)) is None:
            return
        h, body = d
        if not isinstance(h, UploadChunk):
            self._replies.unexpected(h, "upload", sender)
            return
        if h.source is None and h.device != sender:
            self._replies.error(forged(h, sender))
            return
        if h.source is not None and not self._peers.expects(h, sender):
            # a push nobody asked for (or claiming another pusher): counted, not answered;
            # the device it names did not ask for it either
            self._replies.error(
                ProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"block {h.block} pushed by {sender} (source {h.source}) was not requested",
                )
            )
            return
        why = self._loader.quarantine.reason(h.block_sha256)
        if why is not None:
            msg = f"block {h.block} is quarantined: {why}"
            self._replies.chunk_error(h, ErrorCode.QUARANTINED, msg)
            return
        self._loader.chunk(h, body)

    def _query(self, h: Query, body: memoryview, arrived: float) -> None:
        """On the loop: a query of a model without a chain yet (it is made here)."""
        if self._stopping():
            return
        checked = self._check_query(h, self._loader.chain(h.model_id))
        if isinstance(checked, ProtocolError):
            self._replies.error(checked)
        elif checked is not None:
            self.store.touch(h.model_id)
            self._queries.submit(h, body, arrived, checked)

    def _check_query(self, h: Query, ch: Chain | None) -> Chain | ProtocolError | None:
        """Any thread: the chain to run ``h`` on, why it is refused, or None when the model
        is announced but has no chain yet. Reads only the store's index and the quarantine's
        snapshot (thread-safe)."""

        def refuse(code: ErrorCode, message: str) -> ProtocolError:
            return ProtocolError(code, message, request_id=h.request_id, device=h.device)

        a = self.store.model(h.model_id)
        if a is None:
            return refuse(ErrorCode.UNKNOWN_MODEL, f"model {h.model_id[:12]}… is not announced")
        if not 0 <= h.start < h.end <= len(a.blocks):
            return refuse(
                ErrorCode.BAD_RANGE,
                f"block range [{h.start}, {h.end}) outside [0, {len(a.blocks)})",
            )
        out = a.blocks[h.end - 1].output
        if out.nbytes > self._max_tensor_bytes:  # the announce's word, sized before any run
            return refuse(
                ErrorCode.BAD_RANGE,
                f"block {h.end - 1} announces an output of {out.nbytes} bytes, over the edge's "
                f"max_tensor_bytes ({self._max_tensor_bytes})",
            )
        want = a.blocks[h.start].input
        # pixels (uint8, normalised here) stand for a float32 input of the same shape
        dtype = "float32" if h.pixels is not None else h.tensor.dtype
        if dtype != want.dtype or h.tensor.shape != want.shape:
            got = f"{h.tensor.dtype}{list(h.tensor.shape)}{' pixels' if h.pixels else ''}"
            return refuse(
                ErrorCode.BAD_TENSOR,
                f"block {h.start} expects {want.dtype}{list(want.shape)}, got {got}",
            )
        q = self._loader.quarantine
        bad = [i for i in range(h.start, h.end) if a.blocks[i].onnx_sha256 in q] if len(q) else []
        if bad:
            why = q.reason(a.blocks[bad[0]].onnx_sha256)
            return refuse(ErrorCode.QUARANTINED, f"blocks {bad} are quarantined: {why}")
        missing = [
            i for i in range(h.start, h.end) if not self.store.has_block(a.blocks[i].onnx_sha256)
        ]
        if missing:
            return refuse(ErrorCode.BLOCKS_MISSING, f"blocks {missing} are not uploaded")
        return ch
