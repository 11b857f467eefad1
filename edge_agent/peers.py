"""Edge-to-edge block transfer at a handoff.

The device tells the new edge B which blocks to fetch from the old edge A (``Transfer``). B
connects to A's broker (or uses its own when they share one), subscribes to its own upload
topic there and sends A a ``PeerFetch``. A pushes each block, chunked like a device upload, to
B's upload topic on A's broker, in the device's name, after checking the block's digest again.
B stores the chunks through the same path as a device upload (digest, screening) and acks the
device, which therefore sees the blocks arrive exactly as if it had sent them.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from iotoffload.transport.frame import Error, PeerFetch, Transfer, UploadChunk, encode
from iotoffload.transport.mqtt import BrokerUnavailableError, BrokerURL, Handler, MqttLink
from iotoffload.transport.topics import Topics

log = logging.getLogger(__name__)


class PeerTransfers:
    def __init__(
        self,
        edge_id: str,
        topics: Topics,
        *,
        own_link: Callable[[], MqttLink],
        own_broker: Callable[[], str],
        on_upload: Handler,
        block_path: Callable[[str, int], tuple[str, Path] | None],
        reply_error: Callable[[str, Error], None],
        allowed_brokers: list[str],
        protocol: int,
        chunk_bytes: int,
    ) -> None:
        self.edge_id = edge_id
        self.topics = topics
        self._own_link = own_link
        self._own_broker = own_broker
        self._on_upload = on_upload
        self._block_path = block_path  # (model id, index) -> (sha256, file path) if stored
        self._reply_error = reply_error
        self._allowed = allowed_brokers
        self._protocol = protocol
        self._chunk = chunk_bytes
        self._links: dict[str, MqttLink] = {}
        self._lock = threading.Lock()
        self._push_jobs: queue.Queue[PeerFetch | None] = queue.Queue()
        self._pusher: threading.Thread | None = None
        self.blocks_pushed = 0
        self.refused_digest = 0

    # the new edge: pull ---------------------------------------------------------------------
    def broker_allowed(self, url: str) -> bool:
        try:
            u = str(BrokerURL.parse(url))
        except ValueError:
            return False
        allowed = {str(BrokerURL.parse(b)) for b in self._allowed if b != "*"}
        return "*" in self._allowed or u == str(BrokerURL.parse(self._own_broker())) or u in allowed

    def pull(self, t: Transfer) -> None:
        """Ask the old edge to push ``t.blocks`` to us (runs off the network thread)."""
        if not self.broker_allowed(t.source_broker):
            self._reply_error(
                t.device,
                Error(
                    request_id=f"transfer:{t.source_edge}",
                    code="transfer_refused",
                    message=f"broker {t.source_broker} is not an allowed peer (edge peer_brokers)",
                ),
            )
            return
        threading.Thread(target=self._pull, args=(t,), name="peer-pull", daemon=True).start()

    def _pull(self, t: Transfer) -> None:
        try:
            link = self._link_to(t.source_broker)
        except BrokerUnavailableError as e:
            self._reply_error(
                t.device,
                Error(
                    request_id=f"transfer:{t.source_edge}", code="transfer_failed", message=str(e)
                ),
            )
            return
        fetch = PeerFetch(peer=self.edge_id, device=t.device, model_id=t.model_id, blocks=t.blocks)
        link.publish(self.topics.edge_control(t.source_edge), encode(fetch))
        log.info(
            "asked %s for %d blocks of %s… for %s",
            t.source_edge,
            len(t.blocks),
            t.model_id[:12],
            t.device,
        )

    def _link_to(self, url: str) -> MqttLink:
        key = str(BrokerURL.parse(url))
        if key == str(BrokerURL.parse(self._own_broker())):
            return self._own_link()  # already subscribed to our upload topic there
        with self._lock:
            link = self._links.get(key)
            if link is None:
                link = MqttLink(key, f"edge-{self.edge_id}-peer", protocol=self._protocol)
                link.subscribe(self.topics.edge_upload(self.edge_id), self._on_upload)
                link.connect(5.0)
                self._links[key] = link
            return link

    # the old edge: push ---------------------------------------------------------------------
    def push(self, f: PeerFetch) -> None:
        """Queue a peer's fetch; one pusher thread sends blocks one after the other."""
        with self._lock:
            if self._pusher is None or not self._pusher.is_alive():
                self._pusher = threading.Thread(
                    target=self._push_loop, name="peer-push", daemon=True
                )
                self._pusher.start()
        self._push_jobs.put(f)

    def _push_loop(self) -> None:
        while True:
            f = self._push_jobs.get()
            if f is None:
                return
            for i in f.blocks:
                try:
                    self._push_block(f, i)
                except Exception as e:  # one bad block must not stop the others
                    log.exception("pushing block %d to %s failed", i, f.peer)
                    self._fail(f, i, f"{type(e).__name__}: {e}")

    def _fail(self, f: PeerFetch, i: int, why: str) -> None:
        self._reply_error(
            f.device,
            Error(
                request_id=f"transfer-block:{f.peer}:{i}",
                code="transfer_failed",
                message=f"block {i} from {self.edge_id}: {why}",
            ),
        )

    def _push_block(self, f: PeerFetch, i: int) -> None:
        found = self._block_path(f.model_id, i)
        if found is None:
            self._fail(f, i, "not stored here")
            return
        sha, path = found
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:  # rot on disk: never pass it on
            self.refused_digest += 1
            self._fail(f, i, "stored copy fails its digest")
            return
        link = self._own_link()
        chunks = -(-len(data) // self._chunk)
        infos = []
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
            infos.append(link.publish(self.topics.edge_upload(f.peer), encode(h, body)))
        for info in infos:  # one block in flight at a time: queries keep their share
            info.wait_for_publish(30)
        self.blocks_pushed += 1

    def close(self) -> None:
        self._push_jobs.put(None)
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
