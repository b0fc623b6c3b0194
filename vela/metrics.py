"""What the server measures, as plain calls; the Ray dashboard gets them through
:class:`actors._metrics.RayMetrics`. The default, :class:`Metrics`, records
nothing, so the logic never depends on Ray to run or to be tested.

Metric names, shown in the Ray dashboard (and Prometheus) with a ``ray_`` prefix:

==============================  =========  ===========  =================================
name                            kind       tags         meaning
==============================  =========  ===========  =================================
vela_workers                    gauge      status       registered workers per status
vela_free_slots                 gauge      route        free build slots per route
                                                        (backlog room included)
vela_running_builds             gauge                   builds running on workers
vela_queue_depth                gauge      route        items waiting per route
vela_builds_finished_total      counter    status       builds ended, per final status
vela_dispatch_latency_seconds   histogram               enqueue → execute_package accepted
vela_token_rejections_total     counter    reason       refused tokens, proofs, answers
vela_coalesced_calls_total      counter    target,      the Scheduler's coalesced calls
                                           method       (vela.coalesce) to the Authority,
                                                        the database and the workers
vela_coalesced_requests_total   counter    target,      the requests those calls carried
                                           method       (over calls: requests per call)
==============================  =========  ===========  =================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

# (target, method) -> (calls, requests): what coalesced calls carried since the last time.
CallIncrements = Mapping[tuple[str, str], tuple[int, int]]

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

    def coalesced(self, increments: CallIncrements) -> None:
        pass


class CallCounter:
    """Turns the coalescers' running totals into counter increments per target and
    method. Totals are keyed (target, source, method), the source being one client (a
    worker's hostname, say); one whose totals went down (a new client, after the worker
    attached again) counts again from zero, and one that is gone is forgotten."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str, str], tuple[int, int]] = {}

    def increments(self, totals: Mapping[tuple[str, str, str], tuple[int, int]]
                   ) -> dict[tuple[str, str], tuple[int, int]]:
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for key, (calls, requests) in totals.items():
            last_calls, last_requests = self._last.get(key, (0, 0))
            if calls < last_calls or requests < last_requests:
                last_calls, last_requests = 0, 0
            if calls == last_calls and requests == last_requests:
                continue
            target, _, method = key
            c, r = out.get((target, method), (0, 0))
            out[target, method] = (c + calls - last_calls, r + requests - last_requests)
        self._last = dict(totals)
        return out


class RecordingMetrics(Metrics):
    """Keeps the last gauges and counts in memory (tests, `status` output)."""

    def __init__(self) -> None:
        self.gauges: dict[str, dict[str, float]] = {}
        self.finished: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.calls: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()

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

    def coalesced(self, increments: CallIncrements) -> None:
        for key, (calls, requests) in increments.items():
            self.calls[key] += calls
            self.requests[key] += requests
