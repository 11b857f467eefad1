"""Bench helper for ``bench scale``: M devices, each its own MQTT connection, offloading back
to back to one edge, in a process of their own (so that their Python does not share the
edge's GIL). Each device sends the intermediate tensor of blocks ``[start, end)`` (computed
once by the parent: the devices' front compute is not what this measures), keeps
``window`` queries in flight (1: waits for each answer; more: a device streaming frames) and
sends the next from paho's callback: no thread per device beyond paho's own.

Reads one JSON job on stdin, prints one JSON line: the latencies and answers per device.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from iotoffload.transport.frame import Error, FrameError, Query, Result, decode, encode_tensor_frame
from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.security import MqttSecurity
from iotoffload.transport.topics import Topics


class _Device:
    """One device's closed loop: ``window`` queries out, each answer in lets the next out."""

    def __init__(self, job: dict[str, Any], who: str, x: np.ndarray[Any, Any], end_t: float):
        self.who, self.edge = who, job["edge"]
        self.job, self.x, self.end_t = job, x, end_t
        self.topics = Topics()
        self.lat_ms: list[float] = []
        self.batches: list[int] = []
        self.errors: dict[str, int] = {}
        self.done = threading.Event()
        self._n = 0
        self._sent: dict[str, float] = {}  # request id -> send time, of those in flight
        self._lock = threading.Lock()  # start() on the main thread, _on on paho's
        sec = MqttSecurity.model_validate(job["security"].get(who, {}))
        self.link = MqttLink(job["url"], who, protocol=job["protocol"], security=sec)
        self.link.subscribe(self.topics.device_inbox(who, self.edge), self._on)

    def start(self) -> None:
        for _ in range(int(self.job.get("window", 1))):
            self._send()

    def _send(self) -> None:
        with self._lock:
            self._n += 1
            rid = f"{self.who}-{self._n}"
            self._sent[rid] = time.perf_counter()
        frame = encode_tensor_frame(
            Query,
            self.x,
            request_id=rid,
            device=self.who,
            model_id=self.job["model_id"],
            start=self.job["start"],
            end=self.job["end"],
            deadline_ms=10_000,
        )
        self.link.publish(self.topics.edge_query(self.edge, self.who), frame)

    def _on(self, m: Message) -> None:
        try:
            h, _ = decode(m.payload)
        except FrameError:
            return
        if not isinstance(h, Result | Error):
            return
        rid = h.request_id or ""
        with self._lock:
            sent = self._sent.pop(rid, None)
            left = len(self._sent)
        if sent is None:
            return  # not one of ours in flight (or answered twice: counted once)
        now = time.perf_counter()
        if isinstance(h, Result):
            self.lat_ms.append((now - sent) * 1e3)
            self.batches.append(h.batch)
        else:
            self.errors[h.code.value] = self.errors.get(h.code.value, 0) + 1
        if now < self.end_t:
            self._send()
        elif not left:
            self.done.set()


def main() -> None:
    job = json.loads(sys.stdin.readline())
    x = np.load(Path(job["tensor"]))
    devices = job["devices"]
    # connect everyone first: the clock starts once all M are connected
    devs = [_Device(job, f"bench-device-{i}", x, float("inf")) for i in range(devices)]
    for d in devs:
        d.link.connect()
    print(json.dumps({"connected": devices}), flush=True)
    sys.stdin.readline()  # go
    t0 = time.perf_counter()
    end_t = t0 + job["seconds"]
    for d in devs:
        d.end_t = end_t
        d.start()
    for d in devs:
        d.done.wait(job["seconds"] + 30)
    wall = time.perf_counter() - t0
    for d in devs:
        d.link.close()
    print(
        json.dumps(
            {
                "wall_s": wall,
                "lat_ms": [d.lat_ms for d in devs],
                "batches": [b for d in devs for b in d.batches],
                "errors": {
                    k: sum(d.errors.get(k, 0) for d in devs) for d in devs for k in d.errors
                },
                "unanswered": sum(not d.done.is_set() for d in devs),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
