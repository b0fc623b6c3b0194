"""The queue listener's logic: pop only what can be placed, settle only what is safe.

Plain asyncio, no Ray: the ``QueueListener`` actor wraps :class:`Listener`,
and the Scheduler plays the :class:`Dispatcher`.

One pass (:meth:`Listener.run_once`):

1. settle anything left unsettled by a back-end outage (ack/release retried);
2. every ``reclaim_every_s``, return expired leases to their routes;
3. ask the dispatcher for its capacity (free slots per route) and reserve
   up to ``batch`` items, no more than there are free slots, from routes with
   a free slot only, so items that cannot be placed stay in the queue;
4. verify each item (with the server's queue keys as they are now: see
   :class:`KeySource`); a refused item is dead-lettered with its reason code;
5. submit them in one call (``submit_many``) and settle each by outcome:
   DISPATCHED and NOT_PENDING ack, NO_CAPACITY and RETRY release, REJECTED
   dead-letters; an item whose submit raised (or all, if the call did) is released;
6. have the dispatcher queue again (``requeue_pending``) the builds named by items
   refused for their signature alone, if still pending: the refused item may have
   been the build's own (its key since cut, or tampered with).

No polling while idle: with ``wait_s > 0`` the capacity call is a long poll.
The dispatcher answers at once if a slot is free and work was queued since
the listener last found the queue empty, else when that becomes true (a slot
frees, a build is queued), else after ``wait_s``, which is then the polling
period for items queued by anyone else.

The item leaves the queue only after the dispatcher says the build is
durably recorded as dispatched (or was already handled). Since delivery is
at-least-once, exactly-once *dispatch* rests on the dispatcher answering
NOT_PENDING for a build that is no longer pending.

When the back end is unreachable the pass fails, the listener reports
``healthy = False`` with the error, and waits with jittered exponential
backoff before the next pass; items are never lost (they stay leased and
come back after the lease) nor settled twice (stale leases do nothing).
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from sqlalchemy.exc import DBAPIError

from vela.queue.base import Clock, Queue, Reservation, Settlement, Sleep
from vela.queue.item import InvalidReason, ItemVerifier, QueueItem, QueueItemInvalid

log = logging.getLogger(__name__)


MAX_DELIVERIES_REASON = "too_many_deliveries"
SUBMIT_FAILED = "submit_failed"


def is_transient(exc: BaseException) -> bool:
    """The back end is unreachable right now (not: this item is bad). Redis's errors
    count only where redis is loaded: a process on the database queue never loads it."""
    if isinstance(exc, DBAPIError | OSError):
        return True
    redis_errors = sys.modules.get("redis.exceptions")
    return redis_errors is not None and isinstance(
        exc, redis_errors.ConnectionError | redis_errors.TimeoutError)


class Outcome(StrEnum):
    DISPATCHED = "dispatched"     # build durably recorded as dispatched: ack
    NOT_PENDING = "not_pending"   # build already handled (e.g. a redelivery): ack, no dispatch
    NO_CAPACITY = "no_capacity"   # no slot after all: release, the item stays queued
    RETRY = "retry"               # transient trouble placing it: release
    REJECTED = "rejected"         # can never run: dead-letter


@dataclass(frozen=True, slots=True)
class Rejected:
    """A REJECTED outcome with its reason code (e.g. ``build_not_found``)."""

    reason: str
    detail: str = ""

    @property
    def outcome(self) -> Outcome:
        return Outcome.REJECTED


SubmitResult = Outcome | Rejected


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the dispatcher can take now."""

    free: dict[str, int]   # free slots per route (a worker on two routes counts in both)
    total: int = 0         # free slots over all workers, each counted once
    work: int = 0          # bumps whenever the dispatcher's side queued a build


# Builds named by refused items kept while the dispatcher cannot be asked to queue them
# again: a bound, as whoever can write to the queue can name any number.
MAX_CLAIMED = 10_000


@runtime_checkable
class Dispatcher(Protocol):
    """What the listener needs from the Scheduler."""

    async def capacity(self, wait_s: float = 0.0, seen_work: int | None = None) -> Capacity:
        """Free slots now. With ``wait_s > 0``, first wait up to ``wait_s`` until some
        slot is free and, if ``seen_work`` is given, ``work`` differs from it."""
        ...

    async def submit_many(self, items: list[QueueItem]) -> list[SubmitResult | Exception]:
        """Place each build (one call per pass, however many items it holds); answer in
        order, DISPATCHED only once durably recorded, an exception where placing that
        one failed (the item is released)."""
        ...

    async def requeue_pending(self, build_ids: list[int]) -> int:
        """Queue these builds again, those still pending (each a fresh signed item); how
        many. Asked for builds that items refused for their signature named."""
        ...


class KeySource(Protocol):
    """The server's verifying queue keys, followed across rotations
    (:class:`~vela.security.keys.RingHolder`)."""

    async def verifying_keys(self) -> Mapping[str, str]:
        """``{kid: public key}``, reloaded first when they are a period old."""
        ...

    async def reload_unknown(self) -> bool:
        """An item named an unknown kid: reload, unless done less than a period ago."""
        ...


async def submit_each(submit: Callable[[QueueItem], Awaitable[SubmitResult]],
                      items: list[QueueItem]) -> list[SubmitResult | Exception]:
    """:meth:`Dispatcher.submit_many` from a one-build ``submit``, concurrently."""
    results = await asyncio.gather(*(submit(i) for i in items), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r  # cancellation and the like are not a build's outcome
    return results  # type: ignore[return-value]


class Step(StrEnum):
    """What one pass did."""

    IDLE = "idle"                    # nothing queued on routes with capacity
    NO_CAPACITY = "no_capacity"      # no route has a free slot; nothing reserved
    DISPATCHED = "dispatched"
    SKIPPED = "skipped"              # NOT_PENDING: acked without dispatch
    RELEASED = "released"
    DEAD_LETTERED = "dead_lettered"
    LEASE_LOST = "lease_lost"        # lease expired before we settled; the redelivery decides
    BACKEND_ERROR = "backend_error"
    DISPATCHER_ERROR = "dispatcher_error"


class Backoff:
    """Exponential backoff with equal jitter: ``d/2 + U(0, d/2)``, ``d = min(cap, base*2^n)``."""

    def __init__(self, *, base_s: float = 0.2, cap_s: float = 30.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.base_s, self.cap_s, self._rng = base_s, cap_s, rng
        self.failures = 0

    def next(self) -> float:
        d = min(self.cap_s, self.base_s * (2 ** min(self.failures, 32)))
        self.failures += 1
        return d / 2 + self._rng() * d / 2

    def reset(self) -> None:
        self.failures = 0


@dataclass
class ListenerStats:
    reserved: int = 0
    dispatched: int = 0
    acked: int = 0
    released: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    lease_lost: int = 0
    reclaimed: int = 0
    submit_errors: int = 0
    backend_errors: int = 0
    dispatcher_errors: int = 0
    requeued: int = 0  # pending builds queued again after their item was refused

    def as_dict(self) -> dict[str, object]:
        return {
            "reserved": self.reserved, "dispatched": self.dispatched, "acked": self.acked,
            "released": self.released, "dead_lettered": dict(self.dead_lettered),
            "lease_lost": self.lease_lost, "reclaimed": self.reclaimed,
            "submit_errors": self.submit_errors, "backend_errors": self.backend_errors,
            "dispatcher_errors": self.dispatcher_errors, "requeued": self.requeued,
        }


@dataclass(frozen=True, slots=True)
class _Settlement:
    what: Settlement
    done: Step   # what the pass reports once it took effect


def _unknown_kid(verified: QueueItem | Exception) -> bool:
    return isinstance(verified, QueueItemInvalid) \
        and verified.reason is InvalidReason.UNKNOWN_KID


def _ack(res: Reservation, done: Step) -> _Settlement:
    return _Settlement(Settlement(res, "ack"), done)


def _release(res: Reservation) -> _Settlement:
    return _Settlement(Settlement(res, "release"), Step.RELEASED)


def _dead(res: Reservation, reason: str, detail: str) -> _Settlement:
    return _Settlement(Settlement(res, "dead", reason, detail), Step.DEAD_LETTERED)


class Listener:
    def __init__(
        self,
        queue: Queue,
        verifier: ItemVerifier,
        dispatcher: Dispatcher,
        *,
        lease_s: float,
        reserve_timeout_s: float = 1.0,
        reclaim_every_s: float = 5.0,
        idle_s: float = 0.5,
        batch: int = 1,
        wait_s: float = 0.0,
        prefetch: int = 0,
        max_deliveries: int | None = None,
        backoff: Backoff | None = None,
        reconnect: Callable[[], Awaitable[Queue]] | None = None,
        keys: KeySource | None = None,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.queue = queue
        self.verifier = verifier
        # Where the verifier's keys come from; None: the ones it was made with, for ever.
        self.keys = keys
        self.dispatcher = dispatcher
        self.lease_s = lease_s
        self.reserve_timeout_s = reserve_timeout_s
        self.reclaim_every_s = reclaim_every_s
        self.idle_s = idle_s
        self.batch = max(1, batch)
        self.wait_s = wait_s
        self.prefetch = max(0, prefetch)
        self.max_deliveries = max_deliveries
        self.backoff = backoff or Backoff()
        self._reconnect = reconnect
        self._clock = clock
        self._sleep = sleep
        self.stats = ListenerStats()
        self.healthy = True
        self.last_error: str | None = None
        self._next_reclaim = float("-inf")
        self._unsettled: list[_Settlement] = []
        # Builds that items refused for their signature named (:meth:`_requeue_claimed`).
        self._claimed: set[int] = set()
        self._rotation = 0
        # The dispatcher's work counter when the queue was last found empty.
        self._seen_work: int | None = None
        self.last_pass_s = 0.0

    # -- the loop ------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Passes until ``stop`` is set; never dies on an error."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                step = await self.run_once(stop=stop)
            except Exception as e:  # noqa: BLE001 - the loop must outlive any bug
                log.exception("queue listener pass failed")
                self._unhealthy(e)
                await self._pause(self.backoff.next(), stop)
                continue
            self.last_pass_s = time.monotonic() - started
            log.debug("listener pass: %s in %.3fs", step, self.last_pass_s)
            # Back-end errors already backed off inside the pass; a long poll already
            # waited. A release means the item could not be placed now: give the
            # scheduler a moment.
            waited = self.wait_s > 0 or (step is Step.IDLE and self.reserve_timeout_s > 0)
            if step is Step.RELEASED or (not waited and step in (Step.IDLE,
                                                                 Step.NO_CAPACITY)):
                await self._pause(self.idle_s, stop)

    async def run_until_idle(self, max_passes: int = 10_000) -> list[Step]:
        """Burst mode for tests and tools: passes until nothing more happens."""
        steps = []
        for _ in range(max_passes):
            step = await self.run_once()
            steps.append(step)
            if step in (Step.IDLE, Step.NO_CAPACITY):
                break
        return steps

    async def run_once(self, *, stop: asyncio.Event | None = None) -> Step:
        """One pass (up to ``batch`` items, submitted concurrently); returns what
        happened to the first. Back-end errors are absorbed: unhealthy, back off."""
        try:
            await self._settle_leftovers()
            await self._requeue_claimed()
            await self._maybe_reclaim()
            try:
                cap = await self.dispatcher.capacity(self.wait_s, self._seen_work)
            except Exception as e:  # noqa: BLE001 - a dead scheduler must not kill us
                self.stats.dispatcher_errors += 1
                self._unhealthy(e)
                await self._pause(self.backoff.next(), stop)
                return Step.DISPATCHER_ERROR
            routes = self._routes(cap.free)
            if not routes:
                self._healthy()
                return Step.NO_CAPACITY
            # Beyond the free slots, ``prefetch`` items wait in the dispatcher for a slot.
            reserved = await self._reserve(
                routes, min(self.batch, max(cap.total, 1) + self.prefetch))
            self._healthy()
            if not reserved:
                self._seen_work = cap.work
                return Step.IDLE
            self._seen_work = None
            step = (await self._settle(await self._settlements(reserved)))[0]
            await self._requeue_claimed()
            return step
        except Exception as e:
            if not is_transient(e):
                raise
            self.stats.backend_errors += 1
            self._unhealthy(e)
            log.warning("queue back end unavailable: %s", e)
            await self._pause(self.backoff.next(), stop)
            await self._try_reconnect()
            return Step.BACKEND_ERROR

    async def _reserve(self, routes: list[str], n: int) -> list[Reservation]:
        """Up to ``n`` items (in one round trip where the back end can); without the
        long poll, waits up to ``reserve_timeout_s`` for the first to arrive."""
        out = await self.queue.reserve_many(
            routes, n, lease_s=self.lease_s,
            timeout_s=0 if self.wait_s > 0 else self.reserve_timeout_s)
        self.stats.reserved += len(out)
        return out

    # -- one item ------------------------------------------------------------

    async def _settlements(self, reserved: list[Reservation]) -> list[_Settlement]:
        """What to do with each reserved item, in order: items that fail their checks
        are dead-lettered, the rest submitted together and settled by outcome."""
        checked = await self._verify_all(reserved)
        for v in checked:
            if isinstance(v, QueueItemInvalid) and v.claimed_build_id:
                if len(self._claimed) >= MAX_CLAIMED:  # the dispatcher long unable to ask
                    log.warning("too many builds wait to be queued again; %d not kept",
                                v.claimed_build_id)
                    continue
                self._claimed.add(v.claimed_build_id)
        out: list[_Settlement | QueueItem] = [
            self._check(res, verified) for res, verified in zip(reserved, checked,
                                                                strict=True)]
        todo = [(i, x) for i, x in enumerate(out) if isinstance(x, QueueItem)]
        if not todo:
            return out  # type: ignore[return-value]
        try:
            results = await self.dispatcher.submit_many([item for _, item in todo])
            if len(results) != len(todo):
                raise RuntimeError(f"{len(results)} outcomes for {len(todo)} items")
        except Exception as e:  # noqa: BLE001 - e.g. the scheduler died; the items come back
            results = [e] * len(todo)
        for (i, item), result in zip(todo, results, strict=True):
            out[i] = self._by_outcome(reserved[i], item, result)
        return out  # type: ignore[return-value]

    async def _verify_all(self, reserved: list[Reservation]) -> list[QueueItem | Exception]:
        """Each item verified with the current keys; those naming an unknown kid once
        more after a reload (a key rotated in since), unless one was made less than a
        period ago (a flood of forged kids reloads once per period)."""
        if self.keys is not None:
            self.verifier.use_keys(await self.keys.verifying_keys())
        verified = [self._verify(res) for res in reserved]
        if self.keys is not None and any(map(_unknown_kid, verified)) \
                and await self.keys.reload_unknown():
            self.verifier.use_keys(await self.keys.verifying_keys())
            verified = [self._verify(res) if _unknown_kid(v) else v
                        for res, v in zip(reserved, verified, strict=True)]
        return verified

    def _verify(self, res: Reservation) -> QueueItem | Exception:
        try:
            return self.verifier.verify(res.payload, route=res.route)
        except Exception as e:  # noqa: BLE001 - one item must never stop every pass
            return e

    def _check(self, res: Reservation, verified: QueueItem | Exception
               ) -> _Settlement | QueueItem:
        if isinstance(verified, QueueItemInvalid):
            log.warning("dead-lettering queue item %s on %s: %s", res.id, res.route,
                        verified)
            return _dead(res, verified.reason.value, str(verified))
        if isinstance(verified, Exception):
            log.error("dead-lettering queue item %s on %s: it could not be checked (%s)",
                      res.id, res.route, type(verified).__name__)
            return _dead(res, InvalidReason.MALFORMED.value,
                         f"could not be checked: {type(verified).__name__}")
        item = verified
        if self.max_deliveries is not None and res.deliveries > self.max_deliveries:
            return _dead(res, MAX_DELIVERIES_REASON,
                         f"delivered {res.deliveries} times without being settled")
        return item

    def _by_outcome(self, res: Reservation, item: QueueItem,
                    result: SubmitResult | Exception) -> _Settlement:
        if isinstance(result, Exception):
            self.stats.submit_errors += 1
            log.warning("submit of build %s failed, releasing: %r", item.build_id, result)
            return _release(res)
        if isinstance(result, Rejected):
            return _dead(res, result.reason, result.detail)
        try:
            outcome = Outcome(result)
        except ValueError:
            self.stats.submit_errors += 1
            log.error("dispatcher returned %r for build %s; releasing", result, item.build_id)
            return _release(res)
        if outcome is Outcome.DISPATCHED:
            self.stats.dispatched += 1
            return _ack(res, Step.DISPATCHED)
        if outcome is Outcome.NOT_PENDING:
            return _ack(res, Step.SKIPPED)
        if outcome is Outcome.REJECTED:
            return _dead(res, "rejected", "")
        return _release(res)  # NO_CAPACITY, RETRY

    async def _settle(self, todo: list[_Settlement]) -> list[Step]:
        """Settle a pass's items together, or remember them for the next pass if the
        back end is down."""
        try:
            done = await self.queue.settle_many([s.what for s in todo])
        except Exception as e:
            if is_transient(e):
                # Retried first thing next pass, while the leases may still hold;
                # an item whose lease lapses is redelivered and settled then.
                self._unsettled.extend(todo)
            raise
        return [self._account(s, d) for s, d in zip(todo, done, strict=True)]

    def _account(self, s: _Settlement, done: bool) -> Step:
        what = s.what
        if not done:
            self.stats.lease_lost += 1
            log.warning("lease on queue item %s lapsed before it was settled (%s)",
                        what.res.id, what.action)
            return Step.LEASE_LOST
        if what.action == "ack":
            self.stats.acked += 1
        elif what.action == "release":
            self.stats.released += 1
        else:
            self.stats.dead_lettered[what.reason] += 1
        return s.done

    async def _requeue_claimed(self) -> None:
        """Have the dispatcher queue again the pending builds that items refused for
        their signature named: the refused item may have been the build's own (signed
        by a key since cut, or tampered with), and its build would stay pending for
        ever. Unproven names, so only this, which is harmless whoever asks it (a second
        item for a pending build is acked as not pending once it runs). Kept for the
        next pass if the dispatcher cannot be asked now."""
        if not self._claimed:
            return
        ids = sorted(self._claimed)
        try:
            self.stats.requeued += await self.dispatcher.requeue_pending(ids)
        except Exception as e:  # noqa: BLE001 - e.g. the scheduler restarting; next pass
            log.warning("could not have %d build(s) queued again: %r", len(ids), e)
            return
        self._claimed.difference_update(ids)

    async def _settle_leftovers(self) -> None:
        if self._unsettled:
            todo, self._unsettled = self._unsettled, []
            await self._settle(todo)  # raises again if still down; kept for next time

    async def _maybe_reclaim(self) -> None:
        now = self._clock()
        if now < self._next_reclaim:
            return
        n = await self.queue.reclaim_expired(now)
        self._next_reclaim = now + self.reclaim_every_s
        if n:
            self.stats.reclaimed += n
            log.info("returned %d queue item(s) with expired leases", n)

    # -- helpers -------------------------------------------------------------

    def _routes(self, free: Iterable[str]) -> list[str]:
        """Known routes with capacity, rotated each pass so no route starves."""
        free = set(free)
        routes = [r for r in self.verifier.known_routes if r in free]
        if len(routes) > 1:
            k = self._rotation % len(routes)
            self._rotation += 1
            routes = routes[k:] + routes[:k]
        return routes

    def _healthy(self) -> None:
        if not self.healthy:
            log.info("queue listener healthy again")
        self.healthy = True
        self.last_error = None
        self.backoff.reset()

    def _unhealthy(self, e: BaseException) -> None:
        self.healthy = False
        self.last_error = f"{type(e).__name__}: {e}"

    async def _try_reconnect(self) -> None:
        if self._reconnect is None:
            return  # redis-py and SQLAlchemy pools reconnect on the next call
        try:
            fresh = await self._reconnect()
        except Exception as e:  # noqa: BLE001 - still down; next pass tries again
            self._unhealthy(e)
            return
        old, self.queue = self.queue, fresh
        try:
            await old.close()
        except Exception:  # noqa: BLE001,S110 - the old connection is already broken
            pass

    async def _pause(self, delay: float, stop: asyncio.Event | None) -> None:
        if stop is None:
            await self._sleep(delay)
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waiter):
                task.cancel()

    def status(self) -> dict[str, object]:
        return {"healthy": self.healthy, "last_error": self.last_error,
                "unsettled": len(self._unsettled), "last_pass_s": self.last_pass_s,
                **self.stats.as_dict()}
