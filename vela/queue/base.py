"""The queue contract every back end keeps.

Delivery is at-least-once: ``reserve`` hands out an item under a *lease*
(an id and a deadline). The holder settles it with ``ack``, ``release`` or
``dead_letter``; if it never does (it crashed), ``reclaim_expired`` puts the
item back at the head of its route once the deadline has passed, and the
next ``reserve`` delivers it again. Settling with a lease that is no longer
current (reclaimed, and perhaps redelivered to someone else) does nothing and
returns ``False``: a slow consumer can never ack an item twice or ack the
copy another consumer is working on.

Routes passed to ``reserve`` are tried in the order given; each route is
FIFO, and an item that comes back (released or reclaimed) goes to the head.
Item ids are strings on every back end.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

from vela.errors import VelaError

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

# Column sizes of the database back end; the Redis back end keeps the same limits.
MAX_REASON_CHARS = 64
MAX_DETAIL_CHARS = 2000
MAX_ROUTE_CHARS = 250


class QueueError(VelaError):
    """A queue operation was called wrongly (empty route, bad lease length...)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """An item handed out under a lease; settle it before ``deadline``."""

    id: str
    route: str
    payload: bytes
    lease_id: str
    deadline: float
    # 1 on first delivery; each reclaim after an expired lease adds one.
    deliveries: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """How to settle one reservation: ``ack``, ``release`` or ``dead`` (with a reason)."""

    res: Reservation
    action: str
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    route: str
    payload: bytes
    reason: str
    detail: str
    dead_at: float
    created_at: float
    deliveries: int


@dataclass(frozen=True, slots=True)
class RouteDepth:
    ready: int = 0
    in_flight: int = 0
    dead: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Queue(ABC):
    """Abstract queue. Subclasses implement the single-shot primitives."""

    def __init__(self, *, clock: Clock = time.time, poll_interval_s: float = 0.1,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._sleep = sleep

    # -- producing -------------------------------------------------------

    async def push(self, route: str, payload: bytes) -> str:
        """Append ``payload`` to ``route``; returns the new item's id."""
        return await self._push(*check_push(route, payload))

    def pusher_within(self, engine: object) -> Callable[[Any, str, bytes], str] | None:
        """A push that runs inside a transaction of ``engine``'s database — the item
        then exists exactly when that transaction commits — as ``push(session, route,
        payload) -> id``; None if this queue is not in that database."""
        return None

    # -- consuming -------------------------------------------------------

    async def reserve(self, routes: Sequence[str], *, lease_s: float,
                      timeout_s: float = 0) -> Reservation | None:
        """The next item of the first non-empty route, leased for ``lease_s``.

        With ``timeout_s > 0`` it polls until an item arrives or the time is up
        (wall time, not the injected clock, which only dates the leases).
        """
        got = await self.reserve_many(routes, 1, lease_s=lease_s, timeout_s=timeout_s)
        return got[0] if got else None

    async def reserve_many(self, routes: Sequence[str], n: int, *, lease_s: float,
                           timeout_s: float = 0) -> list[Reservation]:
        """Up to ``n`` items, in the order :meth:`reserve` would hand them out one by
        one; with ``timeout_s > 0`` it polls until at least one arrives or the time is
        up. A back end may take them in one round trip."""
        if isinstance(routes, str):
            raise QueueError("reserve takes a sequence of routes, not one string")
        ordered = list(dict.fromkeys(routes))
        if not ordered:
            raise QueueError("reserve needs at least one route")
        for r in ordered:
            _check_route(r)
        if lease_s <= 0:
            raise QueueError("lease_s must be positive")
        if n < 1:
            raise QueueError("reserve at least one item")
        give_up = time.monotonic() + max(timeout_s, 0)
        while True:
            got = await self._reserve_batch(ordered, lease_s, n)
            if got:
                return got
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                return []
            await self._sleep(min(self._poll_interval_s, remaining))

    @abstractmethod
    async def ack(self, res: Reservation) -> bool:
        """Remove the item for good. ``False`` if the lease is no longer current."""

    @abstractmethod
    async def release(self, res: Reservation) -> bool:
        """Put the item back at the head of its route, ready now.

        A release is a "not now", not a failed delivery: it does not count
        towards ``deliveries``. ``False`` if the lease is no longer current.
        """

    @abstractmethod
    async def dead_letter(self, res: Reservation, reason: str, detail: str = "") -> bool:
        """Park the item with a reason code. ``False`` if the lease is no longer current."""

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[bool]:
        """Settle each reservation as told, answering as :meth:`ack`, :meth:`release`
        and :meth:`dead_letter` do, in order. Items released together, given in the
        order they were reserved, go back to the head of their route in that order.
        Here acks and dead letters go concurrently, releases one by one (the last
        first); a back end may do it all in one round trip. An error may leave some
        settled and some not (settling again is safe: a lease no longer current does
        nothing)."""
        check_settlements(settlements)
        releases = [i for i, x in enumerate(settlements) if x.action == "release"]
        others = [i for i, x in enumerate(settlements) if x.action != "release"]

        def one(x: Settlement) -> Awaitable[bool]:
            if x.action == "ack":
                return self.ack(x.res)
            return self.dead_letter(x.res, x.reason, x.detail)

        results = await asyncio.gather(*(one(settlements[i]) for i in others),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        done: dict[int, bool] = dict(zip(others, results, strict=True))  # type: ignore[arg-type]
        for i in reversed(releases):
            done[i] = await self.release(settlements[i].res)
        return [done[i] for i in range(len(settlements))]

    @abstractmethod
    async def reclaim_expired(self, now: float | None = None) -> int:
        """Return items whose lease deadline is ``<= now`` to the head of their route."""

    # -- inspecting and repairing ------------------------------------------

    @abstractmethod
    async def depth(self) -> dict[str, RouteDepth]:
        """Counts per route, for routes that hold at least one item."""

    @abstractmethod
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, most recent first."""

    @abstractmethod
    async def requeue(self, dead_id: str) -> str:
        """Move a dead letter back to the tail of its route as a new item.

        Returns the new id; raises :class:`vela.errors.NotFound` if
        ``dead_id`` is not a dead letter.
        """

    async def epoch(self) -> str | None:
        """An id that changes when the back end has lost its contents (e.g. a Redis
        restart without persistence); None where contents are durable."""
        return None

    @abstractmethod
    async def close(self) -> None:
        """Release connections this queue owns (not ones it was given)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- back-end primitives -----------------------------------------------

    @abstractmethod
    async def _push(self, route: str, payload: bytes) -> str: ...

    async def _reserve_once(self, routes: list[str], lease_s: float) -> Reservation | None:
        """The next item, as :meth:`reserve`; a back end implements this or
        :meth:`_reserve_batch` (ours take whole batches)."""
        raise NotImplementedError

    async def _reserve_batch(self, routes: list[str], lease_s: float,
                             n: int) -> list[Reservation]:
        """Up to ``n`` items; one by one unless the back end can do better. Items it
        holds when an error strikes are returned (the error comes again next time)."""
        out: list[Reservation] = []
        while len(out) < n:
            try:
                res = await self._reserve_once(routes, lease_s)
            except Exception:
                if not out:
                    raise
                break
            if res is None:
                break
            out.append(res)
        return out

    def _now(self, now: float | None = None) -> float:
        return self._clock() if now is None else now


def _check_route(route: str) -> None:
    if not isinstance(route, str) or not route.strip() or len(route) > MAX_ROUTE_CHARS:
        raise QueueError(f"invalid route {route!r}: a non-empty name of at most "
                         f"{MAX_ROUTE_CHARS} characters")


def check_settlements(settlements: Sequence[Settlement]) -> None:
    for s in settlements:
        if s.action not in ("ack", "release", "dead"):
            raise QueueError(f"unknown settlement {s.action!r}")


def clip_reason(reason: str, detail: str) -> tuple[str, str]:
    """Reason codes and details are bounded so one bad item cannot bloat storage."""
    return str(reason)[:MAX_REASON_CHARS] or "unspecified", str(detail)[:MAX_DETAIL_CHARS]


def check_push(route: str, payload: bytes) -> tuple[str, bytes]:
    _check_route(route)
    if not isinstance(payload, bytes | bytearray):
        raise QueueError("queue payloads are bytes")
    return route, bytes(payload)
