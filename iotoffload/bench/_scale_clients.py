"""Bench helper for ``bench scale``: M devices, each its own MQTT connection, offloading back
to back to one edge, in a process of their own (so that their Python does not share the
edge's GIL). Each device sends the intermediate tensor of blocks ``[start, end)`` (computed
once by the parent: the devices' front compute is not what this measures), waits for its
answer and sends the next from paho's callback: no thread per device beyond paho's own.

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
    """One device's closed loop: a query out, its answer in, the next query out."""

    def __init__(self, job: dict[str, Any], who: str, x: np.ndarray[Any, Any], end_t: float):
        self.who, self.edge = who, job["edge"]
        self.job, self.x, self.end_t = job, x, end_t
        self.topics = Topics()
        self.lat_ms: list[float] = []
        self.batches: list[int] = []
        self.errors: dict[str, int] = {}
        self.done = threading.Event()
        self._n = 0
        self._sent = 0.0
        sec = MqttSecurity.model_validate(job["security"].get(who, {}))
        self.link = MqttLink(job["url"], who, protocol=job["protocol"], security=sec)
        self.link.subscribe(self.topics.device_inbox(who, self.edge), self._on)

    def start(self) -> None:
        self._send()

    def _send(self) -> None:
        self._n += 1
        frame = encode_tensor_frame(
            Query,
            self.x,
            request_id=f"{self.who}-{self._n}",
            device=self.who,
            model_id=self.job["model_id"],
            start=self.job["start"],
            end=self.job["end"],
            deadline_ms=10_000,
        )
        self._sent = time.perf_counter()
        self.link.publish(self.topics.edge_query(self.edge, self.who), frame)

    def _on(self, m: Message) -> None:
        try:
            h, _ = decode(m.payload)
        except FrameError:
            return
        if not isinstance(h, Result | Error) or h.request_id != f"{self.who}-{self._n}":
            return
        now = time.perf_counter()
        if isinstance(h, Result):
            self.lat_ms.append((now - self._sent) * 1e3)
            self.batches.append(h.batch)
        else:
            self.errors[h.code.value] = self.errors.get(h.code.value, 0) + 1
        if now < self.end_t:
            self._send()
        else:
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
