"""Edge-to-edge block transfer at a handoff.

The device tells the new edge B which blocks to fetch from the old edge A (``Transfer``). B
connects to A's broker (or uses its own when they share one), subscribes to its own upload
topic there and sends A a ``PeerFetch``. A pushes each block (chunked at transfer_chunk_bytes) to
B's upload topic on A's broker, in the device's name, after checking the block's digest again.
B stores the chunks through the same path as a device upload (digest, screening) and acks the
device, which therefore sees the blocks arrive exactly as if it had sent them.

Authorisation (protocol v2: identities are topic levels the broker binds to the client): A
pushes only to an edge in its ``peer_edges`` whose identity is the fetch's sender, only blocks
of a model the named device announced to A itself (B checked that it announced it to B before
asking), each block at most once per fetch. B asks only edges in its own ``peer_edges`` and
accepts a pushed chunk only from the edge it asked, for a block it asked for, for a while.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from iotoffload.transport.frame import (
    ErrorCode,
    PeerFetch,
    ProtocolError,
    Transfer,
    UploadChunk,
    encode,
)
from iotoffload.transport.link import Handler, Link
from iotoffload.transport.mqtt import BrokerURL, MqttLink, MqttSecurity
from iotoffload.transport.topics import ANY, Topics

log = logging.getLogger(__name__)

PUSH_BLOCK_TIMEOUT_S = 30.0  # every chunk of one pushed block acknowledged by the broker
EXPECT_S = 300.0  # how long a pulled block is accepted from its source edge


class PeerTransfers:
    """Both ends of a transfer: the new edge's ``pull`` and the old edge's ``push``.

    Owned by the edge's loop (``edge-loop``): ``pull``, ``push``, ``drain``, the peer links, the
    connects in progress and the counters (``blocks_pushed``, ``refused_digest``) are touched
    only there (other threads may read the counters). Blocking work runs on threads of its own
    and posts back to the loop: peer-broker connects on ``edge-peer-connect`` (one connect per
    broker URL at a time, however many transfers name it: one link per peer broker), pushes on
    the single ``edge-peer-push`` thread. No lock is held anywhere here.
    """

    def __init__(
        self,
        edge_id: str,
        topics: Topics,
        *,
        own_link: Callable[[], Link],
        own_broker: Callable[[], str],
        on_upload: Handler,
        block_path: Callable[[str, int], tuple[str, Path] | None],
        reply_error: Callable[[ProtocolError], None],
        post: Callable[..., None],
        allowed_brokers: list[str],
        allowed_peers: list[str],
        announced_by: Callable[[str, str], bool],
        protocol: int,
        chunk_bytes: int,
        connect_timeout: float = 5.0,
        security: MqttSecurity | None = None,
    ) -> None:
        self.edge_id = edge_id
        self.topics = topics
        self._own_link = own_link
        self._own_broker = own_broker
        self._on_upload = on_upload  # a network-thread handler: it posts to the loop
        self._block_path = block_path  # (model id, index) -> (sha256, file path) if stored
        self._reply_error = reply_error  # on the loop
        self._post = post  # run a function on the loop (from any thread)
        self._allowed = allowed_brokers
        self._peers = frozenset(allowed_peers)
        self._announced_by = announced_by  # (model id, device) -> announced here (any thread)
        # (device, model id, source edge, block) -> accepted until (monotonic), on the loop
        self._expected: dict[tuple[str, str, str, int], float] = {}
        self._protocol = protocol
        self._security = security  # the edge's own credentials, on its peers' brokers too
        self._chunk = chunk_bytes
        self.connect_timeout = connect_timeout
        self._links: dict[str, MqttLink] = {}
        self._connecting: dict[str, asyncio.Task[MqttLink]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = threading.Event()  # read by the pusher between chunks
        self._connector: ThreadPoolExecutor | None = None
        self._pusher: ThreadPoolExecutor | None = None
        self.blocks_pushed = 0
        self.refused_digest = 0
        self.refused_fetches = 0  # peer fetches refused (not a peer, forged, not announced)

    def open(self) -> None:
        """Make the threads' executors (threads start on first use). From the edge's start."""
        self._closing.clear()
        self._connector = ThreadPoolExecutor(4, thread_name_prefix="edge-peer-connect")
        self._pusher = ThreadPoolExecutor(1, thread_name_prefix="edge-peer-push")

    # the new edge: pull (on the loop) ---------------------------------------------------
    def broker_allowed(self, url: str) -> bool:
        try:
            u = str(BrokerURL.parse(url))
        except ValueError:
            return False
        allowed = {str(BrokerURL.parse(b)) for b in self._allowed if b != "*"}
        return "*" in self._allowed or u == str(BrokerURL.parse(self._own_broker())) or u in allowed

    def peer_allowed(self, edge: str) -> bool:
        return edge != self.edge_id and ("*" in self._peers or edge in self._peers)

    def expects(self, h: UploadChunk, sender: str) -> bool:
        """On the loop: whether a pushed chunk is one we asked ``sender`` for (and it says
        so itself)."""
        if h.source != sender:
            return False
        until = self._expected.get((h.device, h.model_id, sender, h.block))
        return until is not None and time.monotonic() < until

    def _expect(self, t: Transfer) -> None:
        now = time.monotonic()
        for k in [k for k, until in self._expected.items() if until <= now]:
            del self._expected[k]
        for i in t.blocks:
            self._expected[(t.device, t.model_id, t.source_edge, i)] = now + EXPECT_S

    def pull(self, t: Transfer) -> None:
        """Ask the old edge to push ``t.blocks`` to us; returns at once (the connect to its
        broker, when needed, runs on a connect thread). ``t`` comes from its device (checked
        by the router), which announced the model here."""
        if not self.peer_allowed(t.source_edge):
            self._reply_error(
                ProtocolError(
                    ErrorCode.TRANSFER_REFUSED,
                    f"edge {t.source_edge} is not a peer of {self.edge_id} (edge peer_edges)",
                    device=t.device,
                    peer=t.source_edge,
                )
            )
            return
        if not self.broker_allowed(t.source_broker):
            self._reply_error(
                ProtocolError(
                    ErrorCode.TRANSFER_REFUSED,
                    f"broker {t.source_broker} is not an allowed peer (edge peer_brokers)",
                    device=t.device,
                    peer=t.source_edge,
                )
            )
            return
        self._expect(t)
        task = asyncio.get_running_loop().create_task(self._pull(t))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pull(self, t: Transfer) -> None:
        try:
            link = await self._link_to(t.source_broker)
        except Exception as e:  # BrokerUnavailableError, or the edge is stopping
            self._reply_error(
                ProtocolError(
                    ErrorCode.TRANSFER_FAILED,
                    str(e) or type(e).__name__,
                    device=t.device,
                    peer=t.source_edge,
                )
            )
            return
        fetch = PeerFetch(peer=self.edge_id, device=t.device, model_id=t.model_id, blocks=t.blocks)
        link.publish(self.topics.edge_control(t.source_edge, self.edge_id), encode(fetch))
        log.info(
            "asked %s for %d blocks of %s… for %s",
            t.source_edge,
            len(t.blocks),
            t.model_id[:12],
            t.device,
        )

    async def _link_to(self, url: str) -> Link:
        key = str(BrokerURL.parse(url))
        if key == str(BrokerURL.parse(self._own_broker())):
            return self._own_link()  # already subscribed to our upload topic there
        link = self._links.get(key)
        if link is not None:
            return link
        pending = self._connecting.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._connect(key))
            self._connecting[key] = pending
        return await asyncio.shield(pending)  # one connect, however many transfers wait

    async def _connect(self, key: str) -> MqttLink:
        try:
            if self._closing.is_set() or self._connector is None:
                raise ConnectionError("the edge is stopping")
            fut = self._connector.submit(self._open_link, key)
            link = await asyncio.wrap_future(fut)
            self._links[key] = link
            return link
        finally:
            self._connecting.pop(key, None)

    def _open_link(self, key: str) -> MqttLink:
        """On a connect thread: a link to a peer's broker, subscribed to our upload topic."""
        link = MqttLink(
            key, f"edge-{self.edge_id}-peer", protocol=self._protocol, security=self._security
        )
        link.subscribe(self.topics.edge_upload(self.edge_id, ANY), self._on_upload)
        link.connect(self.connect_timeout)
        return link

    # the old edge: push -------------------------------------------------------------------
    def push(self, f: PeerFetch, sender: str) -> None:
        """Queue a peer's fetch (on the loop; returns at once) once it is authorised: the
        pusher thread sends the blocks one after the other, each once."""
        if self._closing.is_set() or self._pusher is None:
            return
        why = self._refusal(f, sender)
        if why is not None:
            self.refused_fetches += 1
            log.warning("refused a peer fetch from %s: %s", sender, why)
            if f.peer == sender and self.peer_allowed(sender):
                # a peer's fetch for a model the device did not announce here: tell the
                # device, so it uploads the blocks itself (a stranger's fetch gets no answer:
                # the device it names did not ask)
                self._reply_error(
                    ProtocolError(ErrorCode.TRANSFER_REFUSED, why, device=f.device, peer=f.peer)
                )
            return
        blocks = list(dict.fromkeys(f.blocks))  # each block at most once per fetch
        self._pusher.submit(self._push_all, f.model_copy(update={"blocks": blocks}))

    def _refusal(self, f: PeerFetch, sender: str) -> str | None:
        if f.peer != sender:
            return f"the fetch names peer {f.peer!r} but {sender!r} sent it"
        if not self.peer_allowed(sender):
            return f"edge {sender} is not a peer of {self.edge_id} (edge peer_edges)"
        if not self._announced_by(f.model_id, f.device):
            return f"device {f.device} did not announce model {f.model_id[:12]}… here"
        return None

    def _push_all(self, f: PeerFetch) -> None:
        for i in f.blocks:
            if self._closing.is_set():
                return
            try:
                self._push_block(f, i)
            except Exception as e:  # one bad block must not stop the others
                log.exception("pushing block %d to %s failed", i, f.peer)
                self._post(self._failed, f, i, f"{type(e).__name__}: {e}")

    def _push_block(self, f: PeerFetch, i: int) -> None:
        """On the pusher thread: read, re-check and send one block."""
        found = self._block_path(f.model_id, i)
        if found is None:
            self._post(self._failed, f, i, "not stored here")
            return
        sha, path = found
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:  # rot on disk: never pass it on
            self._post(self._refused, f, i)
            return
        link = self._own_link()
        chunks = -(-len(data) // self._chunk)
        infos: list[Any] = []
        for c in range(chunks):
            h = UploadChunk(
                device=f.device,
                model_id=f.model_id,
                block=i,
                block_sha256=sha,
                block_bytes=len(data),
                chunk=c,
                chunks=chunks,
                chunk_size=self._chunk,
                source=self.edge_id,
            )
            body = data[c * self._chunk : (c + 1) * self._chunk]
            infos.append(
                link.publish(self.topics.edge_upload(f.peer, self.edge_id), encode(h, body))
            )
        deadline = time.monotonic() + PUSH_BLOCK_TIMEOUT_S
        for info in infos:  # one block in flight at a time: queries keep their share
            while not info.is_published():
                if self._closing.is_set():
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not sent within {PUSH_BLOCK_TIMEOUT_S:g} s")
                info.wait_for_publish(0.1)
        self._post(self._pushed)

    # results of the pusher (on the loop) -------------------------------------------------
    def _pushed(self) -> None:
        self.blocks_pushed += 1

    def _refused(self, f: PeerFetch, i: int) -> None:
        self.refused_digest += 1
        self._failed(f, i, "stored copy fails its digest")

    def _failed(self, f: PeerFetch, i: int, why: str) -> None:
        self._reply_error(
            ProtocolError(
                ErrorCode.TRANSFER_FAILED,
                f"block {i} from {self.edge_id}: {why}",
                device=f.device,
                peer=f.peer,
                block=i,
            )
        )

    # stop ---------------------------------------------------------------------------------
    async def drain(self) -> list[MqttLink]:
        """On the loop, when the edge stops: no new pushes or connects; wait for the connects
        in progress (bounded by their timeout) and hand back every peer link, for ``close``."""
        self._closing.set()
        pending = list(self._connecting.values())
        if pending:
            await asyncio.gather(*(asyncio.shield(p) for p in pending), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        links, self._links = list(self._links.values()), {}
        return links

    def close(self, links: list[MqttLink]) -> None:
        """Off the loop, after ``drain``: join the pusher and connect threads, close the links
        (each joins its network thread)."""
        self._closing.set()
        for pool in (self._pusher, self._connector):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pusher = self._connector = None
        rest, self._links = list(self._links.values()), {}  # drain did not run (no loop)
        for link in [*links, *rest]:
            try:
                link.close()
            except Exception:
                log.exception("closing a peer link failed")
