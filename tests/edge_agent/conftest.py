"""A real edge over real MQTT: a mosquitto of our own, edges, and raw clients that speak the
wire protocol with ``MqttLink`` and ``frame`` encode/decode (no DeviceAgent)."""

from __future__ import annotations

import errno
import hashlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_agent.store
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model.manifest import TensorSpec, compute_model_id
from iotoffload.transport.frame import (
    Announce,
    BlockInfo,
    Error,
    FrameError,
    Header,
    Inventory,
    Query,
    Result,
    UploadAck,
    UploadChunk,
    decode,
    encode,
    encode_tensor_frame,
    tensor_of,
)
from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.topics import Topics
from tests.integration.conftest import Mosquitto

WIDTH = 4
_ids = itertools.count()


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for something the edge does asynchronously (its loop answers on its own time)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _add_block(k: float) -> bytes:
    """An ONNX block y = x + k on float32[1, WIDTH] (standard domain: passes screening)."""
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array(np.full((1, WIDTH), k, np.float32), "c")
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        f"add{k:g}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        [c],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return bytes(m.SerializeToString())


@dataclass(frozen=True)
class TinyModel:
    """A chain of ``y = x + (i + 1)`` blocks: block range [a, b) adds sum(i + 1)."""

    blocks: list[bytes]

    @property
    def digests(self) -> list[str]:
        return [hashlib.sha256(b).hexdigest() for b in self.blocks]

    @property
    def model_id(self) -> str:
        return compute_model_id(self.digests)

    def announce(self, device: str) -> Announce:
        t = TensorSpec(name="x", shape=(1, WIDTH))
        infos = [
            BlockInfo(onnx_sha256=d, onnx_bytes=len(b), input=t, output=t)
            for d, b in zip(self.digests, self.blocks, strict=True)
        ]
        return Announce(device=device, model_id=self.model_id, name="tiny", blocks=infos)

    def chunks(self, device: str, i: int, chunk_size: int = 32) -> list[tuple[UploadChunk, bytes]]:
        data = self.blocks[i]
        n = -(-len(data) // chunk_size)
        return [
            (
                UploadChunk(
                    device=device,
                    model_id=self.model_id,
                    block=i,
                    block_sha256=self.digests[i],
                    block_bytes=len(data),
                    chunk=c,
                    chunks=n,
                    chunk_size=chunk_size,
                ),
                data[c * chunk_size : (c + 1) * chunk_size],
            )
            for c in range(n)
        ]

    def expected(self, x: np.ndarray[Any, Any], start: int, end: int) -> np.ndarray[Any, Any]:
        return x + float(sum(range(start + 1, end + 1)))


def tiny_model(n: int = 3) -> TinyModel:
    return TinyModel([_add_block(float(i + 1)) for i in range(n)])


class RawClient:
    """A device without DeviceAgent: one MqttLink, its inbox collected as decoded frames."""

    def __init__(self, url: str, device: str, edge: str, topics: Topics) -> None:
        self.device, self.edge, self.topics = device, edge, topics
        self._cond = threading.Condition()
        self._frames: list[tuple[Header, bytes]] = []
        self.link = MqttLink(url, f"raw-{device}-{next(_ids)}-{time.monotonic_ns()}")
        self.link.subscribe(topics.device_inbox(device, "+"), self._on)
        self.link.connect()

    def _on(self, m: Message) -> None:
        try:
            h, body = decode(m.payload)
        except FrameError:
            return
        with self._cond:
            self._frames.append((h, bytes(body)))
            self._cond.notify_all()

    def take(self, pred: Callable[[Header], bool], timeout: float = 10.0) -> tuple[Header, bytes]:
        """Remove and return the first inbox frame ``pred`` accepts (waiting for it)."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for k, (h, body) in enumerate(self._frames):
                    if pred(h):
                        del self._frames[k]
                        return h, body
                left = end - time.monotonic()
                if left <= 0:
                    got = [type(h).__name__ for h, _ in self._frames]
                    raise AssertionError(f"{self.device}: no such frame within {timeout} s: {got}")
                self._cond.wait(left)

    def error(
        self, pred: Callable[[Error], bool] = lambda _e: True, timeout: float = 10.0
    ) -> Error:
        h, _ = self.take(lambda h: isinstance(h, Error) and pred(h), timeout)
        assert isinstance(h, Error)
        return h

    def inventory(self, timeout: float = 10.0) -> Inventory:
        h, _ = self.take(lambda h: isinstance(h, Inventory), timeout)
        assert isinstance(h, Inventory)
        return h

    def send(self, topic: str, frame: bytes) -> None:
        self.link.publish(topic, frame)

    def control(self, header: Header) -> None:
        self.send(self.topics.edge_control(self.edge, self.device), encode(header))

    def upload_chunk(self, h: UploadChunk, body: bytes) -> None:
        self.send(self.topics.edge_upload(self.edge, self.device), encode(h, body))

    def upload(self, model: TinyModel, timeout: float = 20.0) -> None:
        """Upload every block and wait until each is stored and loaded."""
        for i in range(len(model.blocks)):
            for h, body in model.chunks(self.device, i):
                self.upload_chunk(h, body)
        for i in range(len(model.blocks)):
            ack, _ = self.take(
                lambda h, i=i: isinstance(h, UploadAck) and h.block == i and h.block_done,
                timeout,
            )
            assert isinstance(ack, UploadAck) and ack.loaded

    def query_frame(
        self, model: TinyModel, rid: str, x: np.ndarray[Any, Any], start: int = 0, end: int = 0
    ) -> bytes:
        return encode_tensor_frame(
            Query,
            x,
            request_id=rid,
            device=self.device,
            model_id=model.model_id,
            start=start,
            end=end or len(model.blocks),
            deadline_ms=60_000,
        )

    def result(self, rid: str, timeout: float = 10.0) -> np.ndarray[Any, Any]:
        h, body = self.take(
            lambda h: isinstance(h, Result | Error) and h.request_id == rid, timeout
        )
        assert isinstance(h, Result), h
        return tensor_of(h, memoryview(body))

    def close(self) -> None:
        self.link.close()


class SilentBroker:
    """A TCP server on 127.0.0.1 that accepts connections and never answers MQTT CONNECT."""

    def __init__(self) -> None:
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(0.05)
        self.port = self._srv.getsockname()[1]
        self.accepted = 0
        self.connected = threading.Event()
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-broker", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            self._conns.append(conn)  # held open, never read
            self.accepted += 1
            self.connected.set()

    def __enter__(self) -> SilentBroker:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._conns:
            c.close()
        self._srv.close()


class Harness:
    """Edges and raw clients on one broker; ``close`` stops them all."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.topics = Topics()
        self.edges: list[EdgeAgent] = []
        self.clients: list[RawClient] = []

    def edge(self, edge_id: str = "edge1", url: str | None = None, **config: Any) -> EdgeAgent:
        e = EdgeAgent(
            EdgeConfig(
                id=edge_id,
                broker=url or self.url,
                store=self.tmp_path / f"store-{edge_id}",
                advertise=False,
                **{"status_interval": 0.2, **config},
            )
        )
        e.start()
        self.edges.append(e)
        return e

    def client(
        self, device: str = "dev1", edge: str = "edge1", url: str | None = None
    ) -> RawClient:
        c = RawClient(url or self.url, device, edge, self.topics)
        self.clients.append(c)
        return c

    def close(self) -> None:
        clients, self.clients = self.clients, []
        edges, self.edges = self.edges, []
        for c in clients:
            c.close()
        for e in edges:
            e.stop()


@pytest.fixture
def mosquitto_url(tmp_path: Path) -> Iterator[str]:
    with Mosquitto(tmp_path) as m:
        yield m.url


@pytest.fixture
def harness(mosquitto_url: str, tmp_path: Path) -> Iterator[Harness]:
    """Fails the test when a stopped edge (or a closed client) leaves a thread behind."""
    before = set(threading.enumerate())
    h = Harness(mosquitto_url, tmp_path)
    try:
        yield h
    finally:
        h.close()
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left behind: {left}"


def full_disk(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Writes under a path part ``where`` (e.g. "partial", "blocks") fail with ENOSPC."""
    real = edge_agent.store._atomic_write

    def write(path: Path, data: bytes) -> None:
        if where in path.parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(edge_agent.store, "_atomic_write", write)
