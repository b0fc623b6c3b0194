"""What the server measures, as plain calls; the Ray dashboard gets them through
:class:`actors._metrics.RayMetrics`. The default, :class:`Metrics`, records
nothing, so the logic never depends on Ray to run or to be tested.

Metric names, shown in the Ray dashboard (and Prometheus) with a ``ray_`` prefix:

==============================  =========  ===========  =================================
name                            kind       tags         meaning
==============================  =========  ===========  =================================
vela_workers                    gauge      status       registered workers per status
vela_free_slots                 gauge      route        free build slots per route
vela_running_builds             gauge                   builds running on workers
vela_queue_depth                gauge      route        items waiting per route
vela_builds_finished_total      counter    status       builds ended, per final status
vela_dispatch_latency_seconds   histogram               enqueue → execute_package accepted
vela_token_rejections_total     counter    reason       refused tokens, proofs, answers
==============================  =========  ===========  =================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

DISPATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The sink interface; this base class records nothing."""

    def workers(self, by_status: Mapping[str, int]) -> None:
        pass

    def free_slots(self, by_route: Mapping[str, int]) -> None:
        pass

    def running_builds(self, n: int) -> None:
        pass

    def queue_depth(self, by_route: Mapping[str, int]) -> None:
        pass

    def build_finished(self, status: str) -> None:
        pass

    def dispatched(self, latency_s: float) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


class RecordingMetrics(Metrics):
    """Keeps the last gauges and counts in memory (tests, `status` output)."""

    def __init__(self) -> None:
        self.gauges: dict[str, dict[str, float]] = {}
        self.finished: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.latencies: list[float] = []

    def workers(self, by_status: Mapping[str, int]) -> None:
        self.gauges["workers"] = dict(by_status)

    def free_slots(self, by_route: Mapping[str, int]) -> None:
        self.gauges["free_slots"] = dict(by_route)

    def running_builds(self, n: int) -> None:
        self.gauges["running_builds"] = {"": n}

    def queue_depth(self, by_route: Mapping[str, int]) -> None:
        self.gauges["queue_depth"] = dict(by_route)

    def build_finished(self, status: str) -> None:
        self.finished[status] += 1

    def dispatched(self, latency_s: float) -> None:
        self.latencies.append(latency_s)

    def rejected(self, reason: str) -> None:
        self.rejections[reason] += 1
