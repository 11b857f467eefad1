"""A small client for applications: find edges, read a model's inventory, send whole-model
queries, follow a device's results. Protocol v2, MQTT 5 or 3.1.1, TLS and credentials.

    from iotoffload.client import AppClient
    from iotoffload.transport.security import MqttSecurity

    with AppClient("mqtts://broker:8883", security=MqttSecurity(ca_file=..., cert_file=...,
                   key_file=...)) as app:
        for st in app.edges():
            print(st.edge, st.models)
        inv = app.inventory("edge-1", model_id)       # name, block count, input spec
        y = app.query("edge-1", model_id, x)          # the model's output, as numpy

The client's id is its broker identity (the username, or the certificate's CN); it is the last
level of every topic it publishes on, as the broker's ACL requires. Answers are taken only from
the edge asked and only in the shape the inventory says. paho's network thread delivers them
to futures; no lock is held across a wait.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from iotoffload.runtime.base import Array
from iotoffload.transport.frame import (
    Error,
    FrameError,
    Hello,
    Inventory,
    ListModels,
    ModelList,
    Pixels,
    Query,
    Result,
    decode,
    encode,
    encode_tensor_frame,
    parse_json,
    tensor_of,
)
from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.security import MqttSecurity
from iotoffload.transport.status import EdgeStatus
from iotoffload.transport.topics import ANY, DEFAULT_PREFIX, Topics, check_id

__all__ = ["AppClient", "QueryError"]


def _settle(fut: concurrent.futures.Future[Any], value: object) -> None:
    """First answer wins; a future cancelled by ``close`` or answered already stays as is."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        fut.set_result(value)


class QueryError(RuntimeError):
    """The edge refused the request: ``code`` is its error code (docs/mqtt-api.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class AppClient:
    """One connection to one broker. Thread-safe: queries may be sent from several threads."""

    def __init__(
        self,
        broker: str,
        app_id: str | None = None,
        *,
        security: MqttSecurity | None = None,
        prefix: str = DEFAULT_PREFIX,
        protocol: int = 5,
    ) -> None:
        self.security = security if security is not None else MqttSecurity()
        self.id = check_id(
            "app", app_id or self.security.identity() or f"app-{uuid.uuid4().hex[:8]}"
        )
        self.topics = Topics(prefix)
        self._lock = threading.Lock()  # the maps below: memory operations only
        self._statuses: dict[str, EdgeStatus] = {}
        self._waiting: dict[str, tuple[str, concurrent.futures.Future[Array | Error], Any]] = {}
        self._inventories: dict[tuple[str, str], list[concurrent.futures.Future[Inventory]]] = {}
        self._model_lists: dict[tuple[str, int], list[concurrent.futures.Future[ModelList]]] = {}
        self._ids = itertools.count(1)
        self.link = MqttLink(broker, self.id, protocol=protocol, security=self.security)
        self.link.subscribe(self.topics.device_inbox(self.id, ANY), self._on_inbox)
        self.link.subscribe(self.topics.edge_status_all(), self._on_status)

    # lifecycle --------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> AppClient:
        """Raises BrokerAuthError or BrokerUnavailableError (iotoffload.transport.mqtt)."""
        self.link.connect(timeout)
        return self

    def close(self) -> None:
        self.link.close()
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            inventories, self._inventories = self._inventories, {}
            lists, self._model_lists = self._model_lists, {}
        for _, fut, _ in waiting.values():
            fut.cancel()
        for pages in lists.values():
            for p in pages:
                p.cancel()
        for futs in inventories.values():
            for f in futs:
                f.cancel()

    def __enter__(self) -> AppClient:
        return self.connect()

    def __exit__(self, *_: object) -> None:
        self.close()

    # edges ------------------------------------------------------------------------------------
    def edges(self, wait: float = 1.0, *, offline: bool = False) -> list[EdgeStatus]:
        """The edges whose retained status says online (least loaded first; with
        ``offline``, those that said they went offline too); waits up to ``wait`` seconds
        for the first statuses after connecting."""
        end = time.monotonic() + wait
        while time.monotonic() < end:
            with self._lock:
                if self._statuses:
                    break
            time.sleep(0.05)
        with self._lock:
            shown = [s for s in self._statuses.values() if offline or s.state == "online"]
        return sorted(shown, key=lambda s: (s.state != "online", s.load.queue, s.edge))

    def inventory(self, edge: str, model_id: str, timeout: float = 5.0) -> Inventory:
        """What ``edge`` holds of a model: ``known``, ``name``, ``blocks`` (the count),
        ``input`` (the spec a query's tensor must have), ``stored``."""
        check_id("edge", edge)
        fut: concurrent.futures.Future[Inventory] = concurrent.futures.Future()
        with self._lock:
            self._inventories.setdefault((edge, model_id), []).append(fut)
        hello = Hello(device=self.id, model_id=model_id)
        self.link.publish(self.topics.edge_control(edge, self.id), encode(hello))
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"edge {edge} sent no inventory within {timeout:g} s") from None
        finally:
            with self._lock:
                futs = self._inventories.get((edge, model_id), [])
                if fut in futs:
                    futs.remove(fut)
                if not futs:
                    self._inventories.pop((edge, model_id), None)

    def models(self, edge: str, timeout: float = 5.0) -> list[str]:
        """Every model id announced to ``edge`` (the retained status lists only the first
        ``status_max_models``): asked a page (``list_models``) at a time."""
        check_id("edge", edge)
        out: list[str] = []
        while True:
            page = self._model_page(edge, len(out), timeout)
            out.extend(page.models)
            if not page.models or len(out) >= page.total:
                return out

    def _model_page(self, edge: str, offset: int, timeout: float) -> ModelList:
        fut: concurrent.futures.Future[ModelList] = concurrent.futures.Future()
        with self._lock:
            self._model_lists.setdefault((edge, offset), []).append(fut)
        ask = ListModels(device=self.id, offset=offset)
        self.link.publish(self.topics.edge_control(edge, self.id), encode(ask))
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"edge {edge} sent no model list within {timeout:g} s") from None
        finally:
            with self._lock:
                futs = self._model_lists.get((edge, offset), [])
                if fut in futs:
                    futs.remove(fut)
                if not futs:
                    self._model_lists.pop((edge, offset), None)

    def query(
        self,
        edge: str,
        model_id: str,
        x: Array,
        *,
        timeout: float = 10.0,
        inventory: Inventory | None = None,
        pixels: Pixels | None = None,
    ) -> Array:
        """Run the whole model on ``edge``: its output. Raises QueryError (the edge refused:
        ``blocks_missing`` while it is not uploaded, ``bad_tensor``...), TimeoutError.
        ``pixels``: ``x`` is an image's uint8 pixels, which the edge normalises with this
        mean and std (the model's preprocessing) into its float32 input."""
        inv = inventory or self.inventory(edge, model_id, timeout)
        if not inv.known or inv.blocks is None or inv.input is None or inv.output is None:
            raise QueryError("unknown_model", f"edge {edge} does not know model {model_id[:12]}…")
        if pixels is not None and (x.dtype != np.uint8 or inv.input.dtype != "float32"):
            raise ValueError(
                f"pixels are uint8 for a float32 model: got {x.dtype} for {inv.input.dtype}"
            )
        x = np.ascontiguousarray(x, dtype=np.uint8 if pixels else np.dtype(inv.input.dtype))
        if tuple(x.shape) != tuple(inv.input.shape):
            raise ValueError(f"input shape {x.shape}; the model takes {inv.input.shape}")
        rid = f"{self.id}-{next(self._ids)}"
        fut: concurrent.futures.Future[Array | Error] = concurrent.futures.Future()
        shape = (inv.output.dtype, tuple(inv.output.shape))
        with self._lock:
            self._waiting[rid] = (edge, fut, shape)
        frame = encode_tensor_frame(
            Query,
            x,
            request_id=rid,
            device=self.id,
            model_id=model_id,
            start=0,
            end=inv.blocks,
            deadline_ms=timeout * 1e3,
            pixels=pixels,
        )
        self.link.publish(self.topics.edge_query(edge, self.id), frame, expiry_s=timeout)
        try:
            got = fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"edge {edge} did not answer within {timeout:g} s") from None
        finally:
            with self._lock:
                self._waiting.pop(rid, None)
        if isinstance(got, Error):
            raise QueryError(got.code.value, got.message)
        return got

    def follow_results(self, device: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The results records ``device`` publishes (docs/mqtt-api.md), as they come; stops
        after ``timeout`` seconds without one (None: never) or when the client closes."""
        q: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

        def on(m: Message) -> None:
            try:
                rec = parse_json(bytes(m.payload))  # any bytes: a value or FrameError
            except ValueError:
                return
            if isinstance(rec, dict):
                q.put(rec)

        self.link.subscribe(self.topics.device_results(check_id("device", device)), on, qos=0)
        while self.link.connected or not q.empty():
            try:
                yield q.get(timeout=timeout if timeout is not None else 1.0)
            except queue.Empty:
                if timeout is not None:
                    return

    # paho's network thread --------------------------------------------------------------------
    def _on_status(self, m: Message) -> None:
        st = EdgeStatus.parse(m.payload)
        if st is None or m.topic != self.topics.edge_status(st.edge):
            return  # not a status, or one claiming another edge's name
        with self._lock:
            self._statuses[st.edge] = st

    def _on_inbox(self, m: Message) -> None:
        sender = self.topics.sender(m.topic)
        if sender is None:
            return
        try:
            h, body = decode(m.payload)
        except FrameError:
            return
        if isinstance(h, Inventory):
            if h.edge not in (None, sender):
                return
            with self._lock:
                futs = list(self._inventories.get((sender, h.model_id), []))
            for f in futs:
                _settle(f, h)
        elif isinstance(h, ModelList):
            if h.edge not in (None, sender):
                return
            with self._lock:
                pending = list(self._model_lists.get((sender, h.offset), []))
            for page in pending:
                _settle(page, h)
        elif isinstance(h, Result | Error) and h.request_id is not None:
            with self._lock:
                entry = self._waiting.get(h.request_id)
            if entry is None or entry[0] != sender:
                return  # not ours, late, or not from the edge asked
            _, fut, shape = entry
            if isinstance(h, Result) and (h.tensor.dtype, tuple(h.tensor.shape)) != shape:
                return  # not the shape the model's output has
            _settle(fut, h if isinstance(h, Error) else np.array(tensor_of(h, body)))
