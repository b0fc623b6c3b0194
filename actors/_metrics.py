"""The server's metrics as ``ray.util.metrics``, so the Ray dashboard shows them."""

from __future__ import annotations

from collections.abc import Mapping

from ray.util import metrics as rm

from vela.domain import WorkerStatus
from vela.metrics import DISPATCH_BUCKETS_S, CallIncrements, Metrics


class RayMetrics(Metrics):
    def __init__(self) -> None:
        self._workers = rm.Gauge("vela_workers", "registered workers per status",
                                 tag_keys=("status",))
        self._free = rm.Gauge("vela_free_slots", "free build slots per route",
                              tag_keys=("route",))
        self._running = rm.Gauge("vela_running_builds", "builds running on workers")
        self._depth = rm.Gauge("vela_queue_depth", "queue items waiting per route",
                               tag_keys=("route",))
        self._finished = rm.Counter("vela_builds_finished_total",
                                    "builds ended, per final status", tag_keys=("status",))
        self._latency = rm.Histogram("vela_dispatch_latency_seconds",
                                     "enqueue to execute_package accepted",
                                     boundaries=list(DISPATCH_BUCKETS_S))
        self._rejected = rm.Counter("vela_token_rejections_total",
                                    "refused tokens, proofs and challenge answers",
                                    tag_keys=("reason",))
        self._calls = rm.Counter("vela_coalesced_calls_total",
                                 "the Scheduler's coalesced calls, per target and method",
                                 tag_keys=("target", "method"))
        self._requests = rm.Counter("vela_coalesced_requests_total",
                                    "requests carried by the Scheduler's coalesced calls",
                                    tag_keys=("target", "method"))
        self._routes: set[str] = set()
        self._depth_routes: set[str] = set()

    def workers(self, by_status: Mapping[str, int]) -> None:
        for status in WorkerStatus:
            self._workers.set(by_status.get(status.value, 0), tags={"status": status.value})

    def free_slots(self, by_route: Mapping[str, int]) -> None:
        # Routes that drop to zero disappear from the mapping: report them as 0.
        self._routes |= set(by_route)
        for route in self._routes:
            self._free.set(by_route.get(route, 0), tags={"route": route})

    def running_builds(self, n: int) -> None:
        self._running.set(n)

    def queue_depth(self, by_route: Mapping[str, int]) -> None:
        self._depth_routes |= set(by_route)
        for route in self._depth_routes:
            self._depth.set(by_route.get(route, 0), tags={"route": route})

    def build_finished(self, status: str) -> None:
        self._finished.inc(tags={"status": status})

    def dispatched(self, latency_s: float) -> None:
        self._latency.observe(latency_s)

    def rejected(self, reason: str) -> None:
        self._rejected.inc(tags={"reason": reason})

    def coalesced(self, increments: CallIncrements) -> None:
        for (target, method), (calls, requests) in increments.items():
            tags = {"target": target, "method": method}
            self._calls.inc(calls, tags=tags)
            self._requests.inc(requests, tags=tags)
