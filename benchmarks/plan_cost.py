"""How long one re-plan takes (per query) for each planner, and each upload-order computation.

python benchmarks/plan_cost.py [--model mobilenet] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from iotoffload.model.cache import ModelCache
from iotoffload.planning import PLANNERS, Estimates, PlanningInputs, chain_profile, make_planner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet")
    ap.add_argument("--repeat", type=int, default=2000)
    a = ap.parse_args()
    pkg = ModelCache.from_settings().resolve(a.model)
    n = pkg.num_blocks
    p = PlanningInputs(
        chain_profile(pkg, [1.0 + i % 3 for i in range(n)], edge_speed=4),
        Estimates(bandwidth_Bps=50e6 / 8, rtt_ms=5),
    )
    half = frozenset(range(n // 2, n))
    print(f"{pkg.name} ({n} blocks): microseconds per call, median of {a.repeat}")
    print(f"{'planner':>13} {'plan(half)':>11} {'plan(all)':>10} {'upload_order':>13}")
    for name in PLANNERS:
        pl = make_planner(name)
        row = []
        for avail in (half, frozenset(range(n))):
            ts = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                pl.plan(p, avail)
                ts.append(time.perf_counter() - t)
            row.append(statistics.median(ts) * 1e6)
        t = time.perf_counter()
        pl.upload_order(p)
        row.append((time.perf_counter() - t) * 1e6)
        print(f"{name:>13} {row[0]:>11.1f} {row[1]:>10.1f} {row[2]:>13.0f}")


if __name__ == "__main__":
    main()
