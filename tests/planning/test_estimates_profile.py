from __future__ import annotations

from pathlib import Path

import pytest

from iotoffload.model import ModelPackage
from iotoffload.planning import Estimates, chain_profile
from iotoffload.runtime import TFLiteExecutor
from iotoffload.runtime.profiling import measure_device_ms, profile_path


def test_estimates_follow_observations() -> None:
    e = Estimates(bandwidth_Bps=1e6, rtt_ms=10.0)
    for _ in range(30):
        e = e.observe_rtt(2.0)
        e = e.observe_round_trip(1_000_000, 2.0 + 100.0)  # 1 MB in 100 ms of wire time
        e = e.observe_reply(exec_ms=30.0, baseline_ms=10.0, queue_ms=50.0)
    assert e.rtt_ms == pytest.approx(2.0, rel=0.01)
    assert e.bandwidth_Bps == pytest.approx(10e6, rel=0.02)
    assert e.load_factor == pytest.approx(3.0, rel=0.01)
    assert e.queue_ms == pytest.approx(50.0, rel=0.01)
    before = e.queue_ms
    e = e.observe_timeout(500.0)
    assert e.queue_ms > before
    small = Estimates(bandwidth_Bps=1e6, rtt_ms=10.0)
    small = small.observe_transfer(100, 50.0)  # a tiny frame says nothing about bandwidth
    assert small.bandwidth_Bps == 1e6


def test_a_busy_edge_raises_the_queue_estimate_toward_its_retry_hint() -> None:
    e = Estimates(bandwidth_Bps=1e6, rtt_ms=10.0, queue_ms=0.0)
    once = e.observe_busy(400.0)
    assert once.queue_ms == pytest.approx(e.alpha * 400.0)  # one EWMA step toward the hint
    for _ in range(60):
        e = e.observe_busy(400.0)
    assert e.queue_ms == pytest.approx(400.0, rel=0.01)
    assert e.observe_busy(float("nan")).queue_ms == e.queue_ms  # a poisoned hint is ignored


def test_device_profile_is_measured_once_and_cached(
    mobilenet: ModelPackage, tmp_path: Path
) -> None:
    tfl = TFLiteExecutor.from_package(mobilenet)
    cache = tmp_path / "models"
    ms = measure_device_ms(mobilenet, tfl, runs=2, cache_dir=cache)
    assert len(ms) == 18 and all(v > 0 for v in ms)
    path = profile_path(mobilenet, tfl, cache)
    assert path.is_file()
    path.write_text(path.read_text().replace(str(ms[0]), "123.0", 1))
    assert measure_device_ms(mobilenet, tfl, cache_dir=cache)[0] == 123.0  # from the cache
    assert measure_device_ms(mobilenet, tfl, runs=2, cache_dir=cache, reprofile=True)[0] != 123.0


def test_chain_profile_from_the_manifest(mobilenet: ModelPackage) -> None:
    p = chain_profile(mobilenet, [1.0] * 18, edge_speed=4)
    assert p.edge_ms == (0.25,) * 18
    assert p.boundary_bytes[0] == 224 * 224 * 3 * 4 and p.boundary_bytes[18] == 4000
    assert p.boundary_bytes[7] == 14 * 14 * 64 * 4
    assert p.upload_bytes == tuple(b.upload_bytes for b in mobilenet.blocks)  # what is sent
    assert sum(p.upload_bytes) < sum(b.onnx_bytes for b in mobilenet.blocks)


def test_the_device_factor_learns_slow_runs_weighted_by_their_length() -> None:
    from iotoffload.planning import Estimates

    e = Estimates()  # alpha 0.3
    long_slow = e.observe_device(ms=200.0, profiled_ms=100.0)  # 2×, a 100 ms run: full weight
    assert long_slow.device_factor == pytest.approx(1.0 + 0.3 * (2.0 - 1.0))
    short = e.observe_device(ms=2.4, profiled_ms=0.6)  # 4×, but 0.6 ms: weight 0.012
    assert short.device_factor - 1.0 < 0.05
    assert e.observe_device(ms=1e6, profiled_ms=100.0).device_factor == pytest.approx(1.9)
    assert e.observe_device(ms=float("nan"), profiled_ms=100.0) is e  # no poisoned sample
    assert e.observe_device(ms=5.0, profiled_ms=0.1) is e  # too short to time


def test_the_overhead_around_local_blocks_is_learned_as_a_ratio_to_their_time() -> None:
    from iotoffload.planning import Estimates

    e = Estimates(device_factor=2.0)  # alpha 0.3
    slow = e.observe_overhead(outside_ms=20.0, blocks_ms=100.0)  # 0.2, a 100 ms run: full weight
    assert slow.device_overhead == pytest.approx(0.3 * 0.2)
    assert slow.device_scale == pytest.approx(2.0 * (1 + 0.06))
    assert e.observe_overhead(outside_ms=1e6, blocks_ms=100.0).device_overhead == 0.3  # <= 1
    assert e.observe_overhead(outside_ms=-5.0, blocks_ms=100.0).device_overhead == 0.0
    short = e.observe_overhead(outside_ms=5.0, blocks_ms=5.0)  # 1.0 but 5 ms: weight 0.03
    assert short.device_overhead == pytest.approx(0.03)
    assert e.observe_overhead(outside_ms=float("nan"), blocks_ms=100.0) is e
    assert e.observe_overhead(outside_ms=5.0, blocks_ms=0.1) is e  # too short to time
