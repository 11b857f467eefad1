"""One device session end to end: find the edge, upload in the background, run queries,
report each and a summary. Shared by ``device-agent`` and ``iotoffload demo``."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import DeviceAgent, QueryOutcome
from device_agent.config import DeviceConfig
from iotoffload.discovery import browse_edges
from iotoffload.model.errors import ModelError
from iotoffload.model.package import ModelPackage
from iotoffload.model.preprocess import IMAGE_SUFFIXES, load_input, sample_photos, top_k
from iotoffload.runtime.base import Array
from iotoffload.transport.mqtt import Message, MqttLink, MqttSecurity
from iotoffload.transport.status import EdgeStatus
from iotoffload.transport.topics import Topics


class NoEdgeError(RuntimeError):
    pass


def find_edge(cfg: DeviceConfig, security: MqttSecurity | None = None) -> tuple[str, str]:
    """(broker URL, edge id): as configured, from retained status, or by zeroconf."""
    if cfg.broker and cfg.edge != "auto":
        return cfg.broker, cfg.edge
    if cfg.broker:
        online = edges_from_status(cfg.broker, cfg.prefix, cfg.protocol, security=security)
        if not online:
            raise NoEdgeError(f"no edge reports itself online on {cfg.broker}")
        allowed = [e for e in online if "*" in cfg.edges or e in cfg.edges]
        if not allowed:
            raise NoEdgeError(f"no allowed edge (edges = {cfg.edges}) is online on {cfg.broker}")
        return cfg.broker, allowed[0]
    if cfg.edge == "auto" and "*" in cfg.edges:
        found = browse_edges(cfg.interface, cfg.discovery_timeout, want=1)
    elif cfg.edge == "auto":
        found = browse_edges(cfg.interface, cfg.discovery_timeout)
        found = [r for r in found if r.id in cfg.edges]
    else:  # other edges may answer first: wait for this one
        found = browse_edges(cfg.interface, cfg.discovery_timeout, edge_id=cfg.edge)
        found = [r for r in found if r.id == cfg.edge]
    if not found:
        raise NoEdgeError(
            f"no edge found by zeroconf on {cfg.interface} within {cfg.discovery_timeout:g} s; "
            "start one (edge-agent start) or give --broker and --edge"
        )
    return found[0].broker, found[0].id


def edges_from_status(
    broker: str,
    prefix: str,
    protocol: int,
    wait: float = 1.0,
    *,
    security: MqttSecurity | None = None,
) -> list[str]:
    """Edge ids whose retained status says online, least loaded first."""
    seen: dict[str, float] = {}
    cid = f"probe-{time.monotonic_ns() % 10**9}"
    link = MqttLink(broker, cid, protocol=protocol, security=security)

    def on_status(m: Message) -> None:  # paho's thread; ``seen`` is read after close()
        s = EdgeStatus.parse(m.payload)
        if s is not None and s.state == "online" and m.topic == Topics(prefix).edge_status(s.edge):
            seen[s.edge] = float(s.load.queue)

    link.subscribe(Topics(prefix).edge_status_all(), on_status)
    link.connect()
    time.sleep(wait)  # retained messages arrive right after subscribing
    link.close()
    return sorted(seen, key=lambda e: (seen[e], e))


def iter_inputs(ref: str, pkg: ModelPackage, count: int) -> Iterator[tuple[str, Array]]:
    """``count`` inputs: synthetic (a new seed each), one file, the images of a folder, or
    ``photos`` (scikit-image's sample photos). Images come as their uint8 pixels: the agent
    sends those to the edge (a quarter of the float32 input's bytes) when it offloads from
    block 0."""
    if ref == "photos":
        ref = str(sample_photos(Path(tempfile.gettempdir()) / "iotoffload-photos"))
    path = Path(ref).expanduser()
    if ref != "synthetic" and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
        if not files:
            raise ModelError(f"{path}: no images or .npy files in this folder")
        for i in range(count):
            f = files[i % len(files)]
            yield f.name, load_input(str(f), pkg.manifest, pixels=True)
        return
    x = None if ref == "synthetic" else load_input(ref, pkg.manifest, pixels=True)
    for i in range(count):
        yield (ref, x) if x is not None else (f"synthetic#{i}", load_input(ref, pkg.manifest, i))


@dataclass
class SessionSummary:
    queries: int = 0
    offloaded: int = 0
    local: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    bytes_uploaded: int = 0
    upload_s: float | None = None
    first_offloaded: int | None = None
    upload_errors: list[str] = field(default_factory=list)
    handoffs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms or [0.0])
        return {
            "summary": True,
            "queries": self.queries,
            "offloaded": self.offloaded,
            "local": self.local,
            "mean_ms": round(float(lat.mean()), 3),
            "p95_ms": round(float(np.percentile(lat, 95)), 3),
            "bytes_uploaded": self.bytes_uploaded,
            "upload_s": None if self.upload_s is None else round(self.upload_s, 3),
            "first_offloaded_query": self.first_offloaded,
            "upload_errors": self.upload_errors,
            "handoffs": self.handoffs,
        }


def outcome_record(o: QueryOutcome, pkg: ModelPackage, name: str, session: str) -> dict[str, Any]:
    """One query's JSON record. ``edge``: the edge that ran its offloaded part (null when it
    ran on the device); ``session_edge``: the device's current edge when the query ended."""
    top = top_k(o.output, pkg.manifest.labels)
    return {
        "query": o.index,
        "input": name,
        "top1": top[0][1],
        "top1_class": top[0][0],
        "top5": [{"class": c, "label": lab, "score": round(s, 6)} for c, lab, s in top],
        "latency_ms": round(o.latency_ms, 3),
        "predicted_ms": round(o.predicted_ms, 3),
        "plan": o.plan,
        "split": o.split,
        "offloaded": o.offloaded,
        "where": "edge" if o.offloaded else "local",
        "reason": o.reason,
        "edge": o.edge,
        "session_edge": session,
        "front_ms": round(o.front_ms, 3),
        "edge_queue_ms": None if o.edge_queue_ms is None else round(o.edge_queue_ms, 3),
        "edge_exec_ms": None if o.edge_exec_ms is None else round(o.edge_exec_ms, 3),
    }


def run_session(
    agent: DeviceAgent,
    inputs: Iterator[tuple[str, Array]],
    *,
    interval: float = 0.0,
    on_query: Callable[[dict[str, Any]], None] | None = None,
    on_upload: Callable[[int, int], None] | None = None,
    wait_upload: bool = False,
    finish_upload: float = 0.0,
) -> SessionSummary:
    """Upload in the background while queries run; each query's record goes to ``on_query``
    and to the device's results topic (for other apps). ``finish_upload``: seconds to let a
    still-running upload end after the last query."""
    summary = SessionSummary()
    t_mono = time.monotonic()
    agent.start_upload(on_upload)  # one coordinator: it follows handoffs
    if wait_upload:
        agent.wait_upload()
    results_topic = agent.topics.device_results(agent.device_id)
    for i, (name, x) in enumerate(inputs):
        out = agent.query(x, index=i)
        rec = outcome_record(out, agent.pkg, name, agent.edge_id)
        summary.queries += 1
        summary.latencies_ms.append(out.latency_ms)
        if out.offloaded:
            summary.offloaded += 1
            if summary.first_offloaded is None:
                summary.first_offloaded = i
        else:
            summary.local += 1
        if agent.link.connected:
            agent.link.publish(results_topic, json.dumps(rec), qos=0)
        if on_query:
            on_query(rec)
        if interval:
            time.sleep(interval)
    agent.wait_upload(finish_upload)  # optionally let the upload end, to report its duration
    summary.upload_s = agent.upload_seconds
    summary.bytes_uploaded = agent.bytes_uploaded
    summary.upload_errors = list(agent.upload_errors)
    summary.handoffs = [
        {
            "from": h.source,
            "to": h.target,
            "reason": h.reason,
            "at_s": round(h.at - t_mono, 3),
            "had": h.target_had,
            "transfer": h.transfer,
        }
        for h in agent.handoffs
    ]
    return summary
