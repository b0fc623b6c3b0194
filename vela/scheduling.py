"""The Scheduler's worker registry and placement, as plain code.

Placement picks, among workers that serve the route, are active, healthy and
have a free slot, the least loaded, then the least recently used (the one
whose load changed longest ago: a round robin among equals). A worker whose
slots are all taken but who holds a backlog (``worker.backlog``) comes after
every worker with a slot free. It is not a scan: per route, eligible workers
sit in buckets keyed by that rank, each bucket in that order, so a choice costs
O(distinct loads), not O(workers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Added to the rank of a worker with no slot free, so it sorts after every one with one.
_BACKLOG_RANK = 1 << 20


@dataclass
class WorkerEntry:
    hostname: str
    routes: frozenset[str]
    build_limit: int
    # Packages it holds beyond its slots, each started when a slot frees (worker.backlog).
    backlog: int = 0
    active: bool = True
    healthy: bool = True
    # Builds dispatched to this worker and not yet ended: each holds a slot.
    running: set[int] = field(default_factory=set)
    # Changes when the worker's actor restarts (its running builds are then lost).
    incarnation: str = ""

    @property
    def load(self) -> int:
        return len(self.running)

    @property
    def free(self) -> int:
        return max(0, self.build_limit + self.backlog - self.load)

    @property
    def rank(self) -> int:
        """Placement order: the running count, after every free slot once all are taken."""
        return self.load if self.load < self.build_limit else _BACKLOG_RANK + self.load

    @property
    def eligible(self) -> bool:
        return self.active and self.healthy and self.free > 0


class WorkerRegistry:
    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._workers: dict[str, WorkerEntry] = {}
        # route -> load -> hostnames in least-recently-used order
        self._buckets: dict[str, dict[int, OrderedDict[str, None]]] = {}
        self._free: dict[str, int] = {}
        self._free_total = 0
        self._where: dict[int, str] = {}  # build id -> the worker it holds a slot on
        # Called after any change that may have freed a slot (the listener's wake-up).
        self._on_change = on_change

    # -------------------------------------------------------------- queries
    def __contains__(self, hostname: str) -> bool:
        return hostname in self._workers

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, hostname: str) -> WorkerEntry | None:
        return self._workers.get(hostname)

    def worker_of(self, build_id: int) -> str | None:
        """The worker ``build_id`` holds a slot on, if any."""
        return self._where.get(build_id)

    def workers(self) -> list[WorkerEntry]:
        return list(self._workers.values())

    def free_slots(self) -> dict[str, int]:
        """Free slots per route, over eligible workers (what the listener asks)."""
        return {route: n for route, n in self._free.items() if n > 0}

    @property
    def free_total(self) -> int:
        """Free slots over eligible workers, each worker counted once."""
        return self._free_total

    def choose(self, route: str, exclude: Iterable[str] = ()) -> WorkerEntry | None:
        buckets = self._buckets.get(route)
        if not buckets:
            return None
        skip = set(exclude)
        for rank in sorted(buckets):
            for hostname in buckets[rank]:
                if hostname not in skip:
                    return self._workers[hostname]
        return None

    # ------------------------------------------------------------ mutations
    def upsert(self, hostname: str, *, routes: Iterable[str], build_limit: int,
               backlog: int = 0, active: bool = True, incarnation: str = "") -> WorkerEntry:
        old = self._workers.get(hostname)
        if old is not None:
            self._unindex(old)
        entry = WorkerEntry(hostname=hostname, routes=frozenset(routes),
                            build_limit=build_limit, backlog=backlog, active=active,
                            incarnation=incarnation,
                            running=set(old.running) if old else set())
        if old is not None:
            entry.healthy = old.healthy
        self._workers[hostname] = entry
        self._index(entry)
        self._changed()
        return entry

    def remove(self, hostname: str) -> WorkerEntry | None:
        entry = self._workers.pop(hostname, None)
        if entry is not None:
            self._unindex(entry)
            for build_id in entry.running:
                if self._where.get(build_id) == hostname:
                    del self._where[build_id]
        return entry

    def assign(self, hostname: str, build_id: int) -> None:
        self._change(hostname, lambda e: e.running.add(build_id))
        self._where[build_id] = hostname

    def release(self, hostname: str, build_id: int) -> bool:
        entry = self._workers.get(hostname)
        if entry is None or build_id not in entry.running:
            return False
        self._change(hostname, lambda e: e.running.discard(build_id))
        if self._where.get(build_id) == hostname:
            del self._where[build_id]
        return True

    def set_health(self, hostname: str, healthy: bool) -> None:
        self._change(hostname, lambda e: setattr(e, "healthy", healthy))

    def set_active(self, hostname: str, active: bool) -> None:
        self._change(hostname, lambda e: setattr(e, "active", active))

    # ------------------------------------------------------------ internals
    def _change(self, hostname: str, fn: Callable[[WorkerEntry], object]) -> None:
        entry = self._workers.get(hostname)
        if entry is None:
            raise KeyError(hostname)
        self._unindex(entry)
        fn(entry)
        self._index(entry)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _index(self, e: WorkerEntry) -> None:
        if not e.eligible:
            return
        self._free_total += e.free
        for route in e.routes:
            self._buckets.setdefault(route, {}).setdefault(e.rank, OrderedDict())[e.hostname] = None
            self._free[route] = self._free.get(route, 0) + e.free

    def _unindex(self, e: WorkerEntry) -> None:
        if not e.eligible:
            return
        self._free_total -= e.free
        for route in e.routes:
            buckets = self._buckets.get(route, {})
            bucket = buckets.get(e.rank)
            if bucket is not None:
                bucket.pop(e.hostname, None)
                if not bucket:
                    del buckets[e.rank]
            self._free[route] = self._free.get(route, 0) - e.free
