"""What planning knows: the chain's profile, the live estimates, device power, and plans."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

Where = Literal["device", "edge"]
Objective = Literal["latency", "energy", "mix"]


@dataclass(frozen=True)
class ChainProfile:
    """Per-block figures of an N-block chain.

    ``device_ms[i]``/``edge_ms[i]``: block i's time on each side (edge: unloaded baseline);
    ``boundary_bytes[b]`` for b = 0..N: bytes crossing boundary b (0 = model input, N = output);
    ``upload_bytes[i]``: what uploading block i costs.
    """

    device_ms: tuple[float, ...]
    edge_ms: tuple[float, ...]
    boundary_bytes: tuple[int, ...]
    upload_bytes: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.device_ms)
        if not (
            len(self.edge_ms) == len(self.upload_bytes) == n and len(self.boundary_bytes) == n + 1
        ):
            raise ValueError("profile lengths do not describe one chain")

    @property
    def n(self) -> int:
        return len(self.device_ms)


@dataclass(frozen=True)
class Estimates:
    """Snapshot of the link and the edge (EWMAs, LoADPart's load factor and queue time).

    Immutable: each ``observe_*`` returns the next snapshot, so a planner always works on
    one consistent view while the agent's loop keeps learning."""

    bandwidth_Bps: float = 10e6 / 8  # noqa: N815 - bytes per second
    rtt_ms: float = 5.0
    load_factor: float = 1.0  # edge execution time / its unloaded baseline
    queue_ms: float = 0.0
    alpha: float = 0.3
    # the device's block times / its profile: what else runs on it (the upload's sending,
    # other apps) slows its share of a query, and the plan should know
    device_factor: float = 1.0
    # the device's wall time around its blocks (normalising pixels, Python, the copies, and a
    # CPU quota stretching them) over its blocks' own time, learned from queries run locally:
    # efficientnet-lite0 on a 25 % device spent ~8 ms of its 48.5 ms outside TFLite, and a
    # plan that knew only the blocks' time kept queries local where offloading was faster
    device_overhead: float = 0.0

    @property
    def device_scale(self) -> float:
        """What a block's profiled device time is multiplied by to predict its share of a
        query's latency (its run now, and the work around it)."""
        return self.device_factor * (1.0 + self.device_overhead)

    def transfer_ms(self, nbytes: int) -> float:
        return nbytes / self.bandwidth_Bps * 1e3 + self.rtt_ms / 2

    def _toward(self, field_: str, sample: float) -> Estimates:
        old: float = getattr(self, field_)
        if not math.isfinite(sample):  # a poisoned sample must not poison the estimate
            return self
        return replace(self, **{field_: old + self.alpha * (sample - old)})

    def observe_rtt(self, ms: float) -> Estimates:
        return self._toward("rtt_ms", max(ms, 0.01))

    def observe_transfer(self, nbytes: int, ms: float) -> Estimates:
        """A transfer of ``nbytes`` took ``ms`` (one way, including rtt/2)."""
        wire = ms - self.rtt_ms / 2
        if nbytes >= 16 * 1024 and wire > 0.05:  # small frames say little about bandwidth
            return self._toward("bandwidth_Bps", nbytes / (wire / 1e3))
        return self

    def observe_rate(self, bytes_per_s: float) -> Estimates:
        """A measured throughput sample (e.g. chunk acks of an upload keeping the link busy)."""
        return self._toward("bandwidth_Bps", bytes_per_s) if bytes_per_s > 0 else self

    def observe_round_trip(self, nbytes: int, ms: float) -> Estimates:
        """A request and its reply, ``nbytes`` in all, spent ``ms`` on the way (the edge's
        queue and execution time already taken out)."""
        if nbytes < 16 * 1024:
            return self.observe_rtt(ms)  # small frames: the time is the round trip itself
        if ms - self.rtt_ms > 0.05:
            return self._toward("bandwidth_Bps", nbytes / ((ms - self.rtt_ms) / 1e3))
        return self

    def observe_device(self, ms: float, profiled_ms: float) -> Estimates:
        """The device ran blocks profiled at ``profiled_ms`` in ``ms``. Samples are clamped
        to [0.5, 4] and weighted by their length (full weight from 50 ms): one descheduled
        short run must not make every plan offload."""
        if profiled_ms < 0.5 or not math.isfinite(ms) or ms <= 0:
            return self  # too short to time reliably
        sample = min(4.0, max(0.5, ms / profiled_ms))
        w = min(1.0, profiled_ms / 50.0) * self.alpha
        return replace(self, device_factor=self.device_factor + w * (sample - self.device_factor))

    def observe_overhead(self, outside_ms: float, blocks_ms: float) -> Estimates:
        """A query ran wholly on the device: ``blocks_ms`` in its blocks, ``outside_ms`` of its
        latency around them. Samples are clamped to [0, 1] (one descheduled query must not
        double every local prediction) and weighted by their length like ``observe_device``."""
        if blocks_ms < 0.5 or not (math.isfinite(outside_ms) and math.isfinite(blocks_ms)):
            return self
        sample = min(1.0, max(0.0, outside_ms / blocks_ms))
        w = min(1.0, blocks_ms / 50.0) * self.alpha
        overhead = self.device_overhead + w * (sample - self.device_overhead)
        return replace(self, device_overhead=overhead)

    def observe_timeout(self, deadline_ms: float) -> Estimates:
        """No answer within the deadline: evidence of load (or a dead link). Raise the
        queueing estimate toward the deadline so the next plans lean on the device."""
        return self._toward("queue_ms", max(deadline_ms, 0.0))

    def observe_busy(self, retry_ms: float) -> Estimates:
        """The edge refused a query for a full queue and expects room in ``retry_ms``: a
        query sent now would wait about that long."""
        return self._toward("queue_ms", max(retry_ms, 0.0))

    def observe_status(self, queue_ms: float) -> Estimates:
        """The edge's periodic status: lets a device that stopped offloading (and so gets no
        replies) see the load go away again."""
        return self._toward("queue_ms", max(queue_ms, 0.0))

    def observe_reply(self, exec_ms: float, baseline_ms: float, queue_ms: float) -> Estimates:
        e = self
        if baseline_ms > 0:
            e = e._toward("load_factor", max(exec_ms / baseline_ms, 0.1))
        return e._toward("queue_ms", max(queue_ms, 0.0))


@dataclass(frozen=True)
class Power:
    """Device power draw (W). Defaults: Raspberry-Pi-4-class board — about 6.4 W under full
    CPU load, 2.7 W idle, and ~1.5 W extra while the Wi-Fi radio transmits (public RPi 4
    power measurements); IONN's phone figures were 7.2 / 4.0 / 6.6 W."""

    compute_w: float = 6.4
    transmit_w: float = 4.2
    idle_w: float = 2.7


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    where: Where


@dataclass(frozen=True)
class Plan:
    segments: tuple[Segment, ...]
    latency_ms: float = 0.0
    energy_mj: float = 0.0
    label: str = ""

    @property
    def edge_blocks(self) -> set[int]:
        return {i for s in self.segments if s.where == "edge" for i in range(s.start, s.end)}

    @property
    def offloads(self) -> bool:
        return bool(self.edge_blocks)

    @property
    def split(self) -> int:
        """Where the device stops (the first edge block), N when fully local."""
        for s in self.segments:
            if s.where == "edge":
                return s.start
        return self.segments[-1].end if self.segments else 0

    def describe(self) -> str:
        return " ".join(
            f"{'D' if s.where == 'device' else 'E'}[{s.start},{s.end})" for s in self.segments
        )


@dataclass(frozen=True)
class PlanningInputs:
    profile: ChainProfile
    estimates: Estimates = field(default_factory=Estimates)
    power: Power = field(default_factory=Power)
    objective: Objective = "latency"
    mix_weight: float = 0.5  # mix: weight of latency (ms) against energy (mJ)
    min_local: int = 0  # privacy: blocks [0, min_local) always run on the device
    load_aware: bool = True
