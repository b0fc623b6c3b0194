"""Placement and bookkeeping cost per dispatch vs the number of registered workers.

    python bench/scheduler_scale.py [--dispatches 200000]

Each dispatch is what the Scheduler does in memory for one build: choose a worker
for the route (least loaded, then least recently used), take a slot, and later
free it; with 10, 100, 1,000 and 10,000 simulated workers on four routes. Target:
the 10,000/10 cost ratio stays <= 1.3 (placement is not a scan).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import deque

from vela.scheduling import WorkerRegistry

ROUTES = ("vela", "large", "gpu", "arm")


def cost_per_dispatch(n_workers: int, dispatches: int, seed: int = 1) -> float:
    rng = random.Random(seed)
    reg = WorkerRegistry()
    for i in range(n_workers):
        reg.upsert(f"w{i}", routes=[ROUTES[i % len(ROUTES)], "vela"], build_limit=4)
    # Keep the fleet half busy, as in steady state.
    running: deque[tuple[str, int]] = deque()
    build = 0
    for _ in range(n_workers * 2):
        w = reg.choose("vela")
        if w is None:
            break
        build += 1
        reg.assign(w.hostname, build)
        running.append((w.hostname, build))
    routes = [rng.choice(ROUTES) for _ in range(dispatches)]
    t0 = time.perf_counter()
    for route in routes:
        w = reg.choose(route)
        if w is not None:
            build += 1
            reg.assign(w.hostname, build)
            running.append((w.hostname, build))
        # The oldest build ends: its slot comes back.
        host, done = running.popleft()
        reg.release(host, done)
    return (time.perf_counter() - t0) / dispatches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dispatches", type=int, default=200_000)
    args = p.parse_args(argv)
    sizes = (10, 100, 1_000, 10_000)
    best = {n: min(cost_per_dispatch(n, args.dispatches, seed=s) for s in (1, 2, 3))
            for n in sizes}
    print(f"{'workers':>8}  {'µs/dispatch':>12}")
    for n in sizes:
        print(f"{n:>8}  {best[n] * 1e6:>12.2f}")
    ratio = best[10_000] / best[10]
    print(f"ratio 10,000/10 = {ratio:.2f}  (target <= 1.3)")
    return 0 if ratio <= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main())
