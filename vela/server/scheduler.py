"""The Scheduler's logic: place builds on workers that prove who they are.

Per build (:meth:`Scheduler.submit_many`, called by the queue listener with its pass):
choose a worker (:class:`~vela.scheduling.WorkerRegistry`) → challenge it →
have the authority mint a token bound to its key and seal the package →
record the build ``running`` on it (compare-and-set from ``pending``) →
``execute_package``. A refusal or a dead worker puts the build back to
``pending`` (the listener then releases the item, which comes back), and the
recorded token dies with that change.

Workers are watched without blocking (:meth:`Scheduler.check_workers`): one
status call in flight per worker; :class:`WorkerGone` (Ray's actor-died
error) means lost at once, silence means lost after
``scheduler.worker_lost_after_s``. A lost worker's builds end ``error`` with
reason ``worker_lost`` if they had started, else go back to the queue.

Everything that matters is in the database, so a restarted Scheduler
rebuilds itself with :meth:`Scheduler.recover`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from vela.coalesce import answer_each
from vela.config import Settings
from vela.db.models import Build, Worker
from vela.db.store import Store
from vela.domain import MAX_BACKLOG, BuildStatus, WorkerStatus
from vela.errors import Conflict, NotFound, WorkerGone
from vela.legacy.modes import check_queueless_routes
from vela.metrics import CallCounter, Metrics
from vela.pipeline import PipelineError
from vela.queue.item import QueueItem
from vela.queue.listener import Capacity, Outcome, SubmitResult, submit_each
from vela.queue.listener import Rejected as ItemRejected
from vela.scheduling import WorkerRegistry
from vela.security import (
    PROOF_ONLY,
    Answer,
    BuildClaims,
    ChallengeBook,
    Purpose,
    Reason,
    Registration,
    Rejected,
    register_worker,
    reports_hash,
    reregister_worker,
)
from vela.security.challenge import Challenge
from vela.server.authority import IssuedPackage
from vela.server.builds import BuildQueue
from vela.server.reports import MAX_MESSAGE_CHARS, ReportWriter, parse_batch, storable

log = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"
CANCELED_BY_USER = "canceled"
DEADLINE_EXCEEDED = "deadline_exceeded"
INVALID_EXECUTABLE = "invalid_executable"  # as the worker says of one it cannot read
# How often the watch loop looks for builds past their deadline (end_overdue).
OVERDUE_CHECK_S = 15.0
# How many times a build's start is signed afresh when its proof went stale or was
# spent before the start could be recorded (see Scheduler._record_start).
START_RESIGNS = 3


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WorkerClient(Protocol):
    """Calls on one worker; :class:`WorkerGone` when it is dead."""

    async def availability(self, challenge: dict[str, Any]) -> dict[str, Any]: ...

    async def execute_package(self, package: dict[str, Any]) -> dict[str, Any]: ...

    async def status(self) -> dict[str, Any]: ...

    async def cancel(self, build_id: int) -> bool: ...

    async def start_report(self, build_id: int) -> dict[str, Any] | None: ...


class WorkerDirectory(Protocol):
    """Finds a worker by the actor name it registered with (None: not alive)."""

    async def connect(self, hostname: str, actor_name: str | None) -> WorkerClient | None: ...


class AuthorityClient(Protocol):
    async def issue_package(self, build_id: int, hostname: str) -> IssuedPackage: ...

    async def verify(self, *, build_id: int, token: object, proof: object,
                     reports_digest: str, worker_sign_key: str | None = None
                     ) -> BuildClaims: ...

    async def key_set(self) -> dict[str, Any]: ...


@dataclass
class _Link:
    client: WorkerClient
    sign_public_key: str
    actor_name: str | None
    check: asyncio.Task[dict[str, Any]] | None = None
    check_started: float = 0.0
    # The Scheduler's placement count when the pending check was asked: a build placed
    # here later (see placed) cannot be in its answer.
    check_placements: int = 0
    # build id -> the placement count when it was last placed here.
    placed: dict[int, int] = field(default_factory=dict)
    next_check: float = 0.0
    failing_since: float | None = None
    # Builds RUNNING here in the DB that the worker no longer runs, and since when.
    missing_since: dict[int, float] = field(default_factory=dict)


@dataclass
class SchedulerStats:
    dispatched: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    requeued: int = 0
    workers_lost: int = 0
    reports: int = 0
    report_rejections: dict[str, int] = field(default_factory=dict)

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class Scheduler:
    def __init__(self, *, store: Store, authority: AuthorityClient, directory: WorkerDirectory,
                 builds: BuildQueue, settings: Settings, metrics: Metrics | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = _utcnow) -> None:
        self.store = store
        self.authority = authority
        self.directory = directory
        self.builds = builds
        self.settings = settings
        # The listener's long poll (:meth:`capacity`) wakes on a freed slot or new work.
        self._wake = asyncio.Event()
        self._work = 0
        self.registry = WorkerRegistry(on_change=self._signal)
        builds.on_enqueued = self._work_queued
        self.book = ChallengeBook(server_id=settings.server.id,
                                  ttl_s=settings.scheduler.challenge_ttl_s)
        self.stats = SchedulerStats()
        self.metrics = metrics or Metrics()
        self._call_counter = CallCounter()
        self.writer = ReportWriter(store, metrics=self.metrics, now=now)
        # Builds on these routes belong to legacy workers (vela.legacy): never
        # dispatched, adopted or ended as lost here.
        self._legacy_routes = frozenset(settings.queue.legacy_route_names())
        self._links: dict[str, _Link] = {}
        self._dirty: dict[str, dict[str, Any]] = {}  # worker rows to write (flush_mirrors)
        self._dispatching: set[int] = set()
        # Builds canceled while being dispatched: their packages are not sent.
        self._canceled: set[int] = set()
        # Lost workers whose builds are not settled yet (the database did not answer):
        # retried each watch pass, until the worker comes back (_attach settles them).
        self._unsettled: dict[str, WorkerStatus] = {}
        # Their builds that started there, though no start was recorded.
        self._started_unrecorded: set[int] = set()
        self._placements = 0  # builds placed on workers so far (_Link.placed)
        # Builds whose start is not recorded yet (set when it is): their reports wait.
        self._starting: dict[int, asyncio.Event] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._queue_epoch: str | None = None
        # A new Scheduler does not know what a volatile queue lost while it was down.
        self._queue_unknown = True
        self._mono = monotonic
        self._now = now
        self._call_timeout = settings.scheduler.health_check_timeout_s
        self._next_overdue_check = 0.0

    def __repr__(self) -> str:
        return f"Scheduler({self.settings.server.id}, workers={len(self.registry)})"

    # -- what the listener asks ------------------------------------------------

    async def capacity(self, wait_s: float = 0.0, seen_work: int | None = None) -> Capacity:
        """Free slots; with ``wait_s``, waits first for a free slot and (when
        ``seen_work`` is given) for a build queued since (the listener's long poll)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            cap = Capacity(self.registry.free_slots(), self.registry.free_total, self._work)
            remaining = deadline - loop.time()
            if (cap.free and seen_work != cap.work) or remaining <= 0:
                return cap
            await self._changed_within(remaining)

    def _signal(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def _work_queued(self) -> None:
        self._work += 1
        self._signal()

    async def submit_many(self, items: list[QueueItem]) -> list[SubmitResult | Exception]:
        """The listener's pass: its builds read in one query, then placed concurrently."""
        builds = await self.store.get_builds([item.build_id for item in items])
        return await submit_each(lambda item: self._submit(item, builds.get(item.build_id)),
                                 items)

    async def requeue_pending(self, build_ids: list[int]) -> int:
        """Queue again, each with a fresh signed item, the builds of ``build_ids`` that
        are still pending and not being placed now: items naming them were refused for
        their signature (by a key since cut, say), which may have been their own."""
        ids, builds = list(build_ids), {}
        for i in range(0, len(ids), 1000):  # one bounded query per thousand
            builds.update(await self.store.get_builds(ids[i:i + 1000]))
        again = [b for b in builds.values() if BuildStatus(b.status) is BuildStatus.PENDING
                 and b.id not in self._dispatching]
        for build in again:
            await self.builds.enqueue(build)
        if again:
            log.warning("queued %d pending build(s) again whose queue item was refused: %s",
                        len(again), ", ".join(str(b.id) for b in again))
        return len(again)

    async def _submit(self, item: QueueItem, build: Build | None) -> SubmitResult:
        if build is None:
            return ItemRejected("build_not_found", f"build {item.build_id}")
        if BuildStatus(build.status) is not BuildStatus.PENDING:
            return Outcome.NOT_PENDING
        if build.route != item.route:
            return ItemRejected("route_mismatch", f"build {build.id} is on {build.route}")
        if build.id in self._dispatching:
            return Outcome.RETRY
        self._dispatching.add(build.id)
        try:
            tried: set[str] = set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.scheduler.prefetch_wait_s
            while True:
                while (entry := self.registry.choose(build.route, exclude=tried)) is not None:
                    tried.add(entry.hostname)
                    outcome = await self._dispatch_to(build, entry.hostname)
                    if outcome is not None:
                        return outcome
                if tried:
                    return Outcome.RETRY
                # No free slot on its route (the listener prefetched it): wait a little
                # for one to free, then it goes back to the queue.
                if not await self._changed_within(deadline - loop.time()):
                    return Outcome.NO_CAPACITY
        finally:
            self._dispatching.discard(build.id)
            self._canceled.discard(build.id)

    async def _changed_within(self, timeout_s: float) -> bool:
        """Wait until the registry changes (a slot freed, say); False after ``timeout_s``."""
        if timeout_s <= 0:
            return False
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _dispatch_to(self, build: Build, hostname: str) -> SubmitResult | None:
        """One placement attempt; None means "try another worker"."""
        link = self._links.get(hostname)
        if link is None:
            return None
        self.registry.assign(hostname, build.id)
        self._placements += 1
        link.placed[build.id] = self._placements
        recorded: IssuedPackage | None = None
        accepted = False
        # Reports the worker sends before its start is recorded wait for it (_record_start).
        starting = asyncio.Event()
        self._starting[build.id] = starting
        started: asyncio.Event | None = starting
        try:
            challenge = self.book.issue(hostname=hostname, build_id=build.id, now=self._now())
            answer = await self._call(link.client.availability(challenge.model_dump(mode="json")))
            free = self.book.consume(challenge, Answer.model_validate_json(json.dumps(answer)),
                                     sign_public_key=link.sign_public_key, now=self._now())
            if free <= 0:
                self._refused(hostname, "no_free_slot")
                return None
            try:
                issued = await self.authority.issue_package(build.id, hostname)
            except PipelineError as e:
                # Its stored executable does not parse (an older vela's, say): it can never
                # run, here or anywhere; released, it would come back for ever.
                await self._end_unrunnable(build.id, str(e))
                return Outcome.NOT_PENDING
            # Should the write fail, its commit may have landed all the same (its answer
            # lost): it is undone below, guarded by this token's id (nothing else is).
            recorded = issued
            try:
                await self.store.transition_build(
                    build.id, BuildStatus.PENDING, BuildStatus.RUNNING, shared=True,
                    worker=hostname, token_jti=issued.jti, dispatched_at=self._now(),
                    attempts=build.attempts + 1)
            except Conflict:
                recorded = None
                return Outcome.NOT_PENDING
            if build.id in self._canceled:
                return Outcome.NOT_PENDING  # canceled while its write was under way
            try:
                receipt: dict[str, Any] | None = await self._call(
                    link.client.execute_package(issued.package))
            except TimeoutError:
                receipt = None  # the package went out and no answer came: it may have started
            if receipt is None or receipt.get("accepted") is True:
                accepted = True
                current = self._links.get(hostname)
                if current is None:
                    # Lost meanwhile (worker_lost left this build to the dispatch): started,
                    # it ends worker_lost; held or unanswered (its start not known, as for
                    # any lost worker's build), it is queued again.
                    if receipt is None or receipt.get("start") is None:
                        self._opened(build.id, starting)
                        started = None
                    await self._settle_lost_dispatch(build.id, hostname,
                                                     started=started is not None)
                    return Outcome.DISPATCHED
                if current is not link:
                    # Lost and registered again meanwhile, its adoption skipping the build
                    # being dispatched: the slot is taken on the worker as it is now.
                    self.registry.assign(hostname, build.id)
                if receipt is None:
                    # Sent elsewhere now, it could run twice; it stays here instead, its
                    # token alive and its slot held, and the worker settles it — its start
                    # is asked for afresh, and a build it turns out not to hold goes back
                    # to the queue after the grace (_reconcile).
                    log.warning("worker %s did not answer the package of build %d in "
                                "time; keeping the build there until the worker says",
                                hostname, build.id)
                    self._spawn(self._unanswered(build.id, hostname, issued, starting))
                    started = None  # opened by _unanswered
                    return Outcome.DISPATCHED
                self.stats.dispatched += 1
                if build.enqueued_at is not None:
                    self.metrics.dispatched((self._now() - build.enqueued_at).total_seconds())
                self._mirror(hostname, last_build_started=self._now())
                if receipt.get("start") is not None:  # else the worker reports it itself
                    self._spawn(self._record_start(build.id, hostname, issued, receipt["start"],
                                                   starting))
                    started = None  # opened by _record_start
                return Outcome.DISPATCHED
            self._refused(hostname, str(receipt.get("reason") or "refused"))
            return None
        except (Rejected, ValidationError) as e:
            reason = e.reason.value if isinstance(e, Rejected) else "malformed_answer"
            self.metrics.rejected(reason)
            log.warning("worker %s failed its challenge (%s); marking it unhealthy",
                        hostname, reason)
            self._refused(hostname, reason)
            self._set_health(hostname, False)
            return None
        except WorkerGone:
            await self.worker_lost(hostname, "actor died")
            return None
        except (TimeoutError, OSError) as e:
            self._refused(hostname, "unreachable")
            log.warning("worker %s did not answer in time: %s", hostname, type(e).__name__)
            return None
        finally:
            if not accepted:
                if recorded is None or await self._undispatch(build.id, recorded.jti):
                    self.registry.release(hostname, build.id)
                # Else the database did not answer: the slot stays taken, so the watch
                # finds the build missing on the worker and queues it again (_reconcile).
            if started is not None:
                self._opened(build.id, started)

    async def _end_unrunnable(self, build_id: int, why: str) -> None:
        try:
            await self.store.transition_build(
                build_id, BuildStatus.PENDING, BuildStatus.ERROR, reason=INVALID_EXECUTABLE,
                message=storable(f"its pipeline as stored cannot run: {why}", MAX_MESSAGE_CHARS))
        except Conflict:
            return
        self.metrics.build_finished(BuildStatus.ERROR.value)
        log.error("build %d ended: its stored executable does not parse", build_id)

    async def _settle_lost_dispatch(self, build_id: int, hostname: str, *,
                                    started: bool) -> None:
        """End (``started``) or requeue a build whose worker was lost while it was
        dispatched there; if the database does not answer, the watch settles it with the
        worker's other builds, knowing whether it started."""
        try:
            await self._end_lost_build(await self.store.get_build(build_id))
        except Exception as e:  # noqa: BLE001 - see _settle_lost_workers
            log.warning("build %d of lost worker %s not settled yet: %s", build_id,
                        hostname, type(e).__name__)
            if started:
                self._started_unrecorded.add(build_id)
            self._unsettled.setdefault(hostname, WorkerStatus.ERROR)

    async def _unanswered(self, build_id: int, hostname: str, issued: IssuedPackage,
                          starting: asyncio.Event) -> None:
        """A package whose receipt never came: record the build's start if the worker
        started it (a fresh copy of the start the receipt carried)."""
        try:
            fresh = await self._fresh_start(hostname, build_id)
            if fresh is not None:
                await self._record_start(build_id, hostname, issued, fresh, starting)
        finally:
            self._opened(build_id, starting)

    async def _record_start(self, build_id: int, hostname: str, issued: IssuedPackage,
                            start: object, started: asyncio.Event) -> None:
        """Record the ``build.start`` report that came with the worker's receipt, checked
        like any report, before any later report on the build. Transient trouble is
        retried (the worker's later reports wait). A proof that went stale or was spent
        before the start could be recorded — the TokenAuthority restarted meanwhile (its
        replay window starts anew), or the write failed after the check — is signed
        afresh by the worker (up to :data:`START_RESIGNS` times); any other refusal
        stops the build there."""
        delay = 0.2
        resigns = 0
        try:
            while True:
                try:
                    await self._apply_reports(build_id=build_id,
                                              token=issued.package.get("build_token"),
                                              **_signed_reports(start))
                    return
                except Rejected as e:
                    if (e.reason in PROOF_ONLY
                            and resigns < START_RESIGNS
                            and (fresh := await self._fresh_start(hostname, build_id))):
                        resigns += 1
                        log.info("build %d: its start's proof was refused (%s); the worker "
                                 "signed it afresh", build_id, e.reason.value)
                        start = fresh
                        continue
                    await self._start_refused(build_id, hostname, issued.jti, e.reason.value)
                    return
                except Exception as e:  # noqa: BLE001 - the database, say: try again
                    log.warning("build %d: cannot record its start yet (%s); retrying",
                                build_id, type(e).__name__)
                    await asyncio.sleep(delay)  # backoff, not synchronisation
                    delay = min(delay * 2, 5.0)
                    if self.registry.worker_of(build_id) != hostname:
                        return  # canceled, or its worker lost, meanwhile
        finally:
            self._opened(build_id, started)

    async def _fresh_start(self, hostname: str, build_id: int) -> dict[str, Any] | None:
        """The worker's ``build.start`` for ``build_id`` with a fresh proof; None if it
        cannot give one (it no longer runs the build, or cannot be reached)."""
        link = self._links.get(hostname)
        if link is None:
            return None
        try:
            return await self._call(link.client.start_report(build_id))
        except Exception as e:  # noqa: BLE001 - then the refusal stands
            log.info("build %d: no fresh start from %s (%s)", build_id, hostname,
                     type(e).__name__)
            return None

    async def _start_refused(self, build_id: int, hostname: str, jti: str, reason: str) -> None:
        """The worker's start did not pass: the build ends ``error`` here unless it has
        moved on (canceled, dispatched again), which also kills its token, and the worker
        is told to stop it."""
        log.warning("build %d: the start report of %s was refused (%s); stopping the build",
                    build_id, hostname, reason)
        try:
            if await self._end_running(
                    build_id, hostname, only_if={"worker": hostname, "token_jti": jti},
                    reason=reason, message=f"worker {hostname} sent a start report that was "
                                           f"refused ({reason})"):
                return
        except Exception as e:  # noqa: BLE001 - the worker's own end report will do
            log.warning("build %d: cannot end it (%s)", build_id, type(e).__name__)
        await self._stop_on_worker(hostname, build_id)

    async def _end_running(self, build_id: int, worker: str | None, *,
                           only_if: dict[str, Any] | None, reason: str, message: str) -> bool:
        """End a running build ``error`` here — its token dies with that — and tell its
        worker to stop it; False if it had moved on (the guards did not hold)."""
        try:
            await self.store.transition_build(build_id, BuildStatus.RUNNING, BuildStatus.ERROR,
                                              only_if=only_if, reason=reason, message=message)
        except Conflict:
            return False
        self.metrics.build_finished(BuildStatus.ERROR.value)
        if worker:
            self._free(worker, build_id, last_build_finished=self._now())
            await self._stop_on_worker(worker, build_id)
        return True

    async def _stop_on_worker(self, hostname: str, build_id: int) -> None:
        """Tell a worker to stop a build the server has ended (best effort: its token is
        dead anyway, so nothing it reports counts)."""
        link = self._links.get(hostname)
        if link is None:
            return
        try:
            await self._call(link.client.cancel(build_id))
        except Exception as e:  # noqa: BLE001 - see above
            log.info("could not tell %s to stop build %d: %s", hostname, build_id,
                     type(e).__name__)

    def _opened(self, build_id: int, started: asyncio.Event) -> None:
        started.set()
        if self._starting.get(build_id) is started:
            del self._starting[build_id]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _undispatch(self, build_id: int, jti: str) -> bool:
        """Back to pending (the token recorded with ``jti`` dies with it); False if the
        database could not be reached."""
        try:
            await self.store.transition_build(build_id, BuildStatus.RUNNING, BuildStatus.PENDING,
                                              only_if={"token_jti": jti}, worker=None,
                                              token_jti=None)
        except Conflict:
            pass
        except Exception as e:  # noqa: BLE001 - see the dispatch's finally
            log.warning("build %d: cannot undo its dispatch yet (%s)", build_id,
                        type(e).__name__)
            return False
        return True

    def _refused(self, hostname: str, reason: str) -> None:
        self.stats.count(self.stats.refused, reason)
        log.info("worker %s did not take a build: %s", hostname, reason)

    async def _call(self, call: Any) -> Any:
        return await asyncio.wait_for(call, self._call_timeout)

    # -- registration ------------------------------------------------------------

    async def register(self, registration: dict[str, Any], *, token: str,
                       running: list[int] | None = None) -> dict[str, Any]:
        """A new worker redeems a registration token; returns the key set to pin."""
        reg = Registration.from_wire(registration)
        # Refused before the token is spent, so the admin can fix the routes and retry.
        check_queueless_routes(reg.routes, self._legacy_routes)
        worker = await register_worker(self.store, reg, token=token, now=self._now())
        await self._attach(reg, worker, running or [])
        return await self.authority.key_set()

    def reregister_challenge(self, hostname: str) -> dict[str, Any]:
        return self.book.issue(hostname=hostname, build_id=None, now=self._now(),
                               purpose=Purpose.REREGISTER).model_dump(mode="json")

    async def reregister(self, registration: dict[str, Any], *, challenge: dict[str, Any],
                         answer: dict[str, Any],
                         running: list[int] | None = None) -> dict[str, Any]:
        """A known worker proves itself by signature after a restart."""
        reg = Registration.from_wire(registration)
        check_queueless_routes(reg.routes, self._legacy_routes)
        try:
            ch = Challenge.model_validate_json(json.dumps(challenge))
            ans = Answer.model_validate_json(json.dumps(answer))
        except ValidationError:
            raise Rejected(Reason.MALFORMED, "challenge or answer") from None
        worker = await reregister_worker(self.store, reg, book=self.book, challenge=ch,
                                         answer=ans, now=self._now())
        await self._attach(reg, worker, running or [])
        return await self.authority.key_set()

    async def key_set(self) -> dict[str, Any]:
        """The server's key set, endorsed by its keys (public): a worker fetches it
        again when a package names a key it has not pinned, after a rotation, and pins
        it only if a key it pins already endorses it."""
        return await self.authority.key_set()

    async def _attach(self, reg: Registration, worker: Worker, running: list[int]) -> None:
        client = await self.directory.connect(reg.hostname, reg.actor_name)
        if client is None:
            raise NotFound(f"worker actor {reg.actor_name!r} not found")
        self._links[reg.hostname] = _Link(client=client, sign_public_key=worker.sign_public_key,
                                          actor_name=reg.actor_name)
        self.registry.upsert(reg.hostname, routes=reg.routes, build_limit=reg.build_limit,
                             backlog=reg.backlog, active=worker.active)
        self.registry.set_health(reg.hostname, True)
        self._unsettled.pop(reg.hostname, None)  # _adopt settles what the loss left
        await self._adopt(reg.hostname, set(running))
        self._mirror(reg.hostname, last_checked_in=self._now())
        log.info("worker %s attached (routes %s, limit %d, backlog %d)", reg.hostname,
                 ",".join(reg.routes), reg.build_limit, reg.backlog)

    async def _adopt(self, hostname: str, running: set[int]) -> None:
        """Take the DB's builds on ``hostname``: those it still runs hold slots; the
        rest were lost with its previous incarnation, or are held in its backlog and go
        back to the queue (their tokens die with that, so they never start there)."""
        for build in await self.store.list_builds(status=[BuildStatus.RUNNING], worker=hostname,
                                                  limit=10_000):
            if build.id in running:
                self.registry.assign(hostname, build.id)
                if build.started_at is None and build.id not in self._starting:
                    # Its start came with a receipt the previous Scheduler did not record.
                    await self.store.set_build_fields(build.id, started_at=self._now())
                self._started_unrecorded.discard(build.id)  # recorded (or was) by now
            elif build.id not in self._dispatching:
                await self._end_lost_build(build)

    # -- what workers report ---------------------------------------------------------

    async def reports(self, *, build_id: int, token: str, proof: str,
                      reports: list[dict[str, Any]]) -> None:
        """A worker's updates on its build (``{action, payload}`` each), in the order
        made, with one proof of possession of ``token`` over all of them: the
        TokenAuthority checks the token and the proof, the writer each report against
        the build's row in the transaction that writes them; all pass or none is
        written."""
        if (started := self._starting.get(build_id)) is not None:
            await started.wait()  # its start, which came with the receipt, goes first
        await self._apply_reports(build_id=build_id, token=token, proof=proof,
                                  reports=reports)

    async def reports_many(self, calls: object) -> list[None | Exception]:
        """Several :meth:`reports` calls in one (a worker's builds, coalesced), each
        ``{build_id, token, proof, reports}``, each checked and written on its own; a
        refusal is the answer of its own call only."""
        return await answer_each(calls, lambda call: self.reports(**_reports_call(call)),
                                 concurrently=True)

    async def _apply_reports(self, *, build_id: int, token: object, proof: object,
                             reports: object) -> None:
        try:
            batch = [(r.action, r.payload) for r in parse_batch(reports)]
            # The key of the worker the build holds a slot on, as registered; the
            # Authority reads it from the database when the build holds none here.
            link = self._links.get(self.registry.worker_of(build_id) or "")
            claims = await self.authority.verify(
                build_id=build_id, token=token, proof=proof,
                reports_digest=reports_hash(batch),
                worker_sign_key=link.sign_public_key if link is not None else None)
            ended = await self.writer.apply_all(
                build_id=build_id, hostname=claims.wkr, reports=batch, claims=claims)
        except Rejected as e:
            self.stats.count(self.stats.report_rejections, e.reason.value)
            self.metrics.rejected(e.reason.value)
            raise
        self.stats.reports += len(batch)
        if ended:
            self._free(claims.wkr, build_id, last_build_finished=self._now())

    def _free(self, hostname: str, build_id: int, **fields: Any) -> None:
        if self.registry.release(hostname, build_id):
            self._mirror(hostname, **fields)

    # -- cancel -------------------------------------------------------------------------

    async def cancel(self, build_id: int) -> BuildStatus:
        """Cancel a pending or running build; returns its status afterwards."""
        while True:
            build = await self.store.get_build(build_id)
            status = BuildStatus(build.status)
            if status.terminal:
                return status
            try:
                await self.store.transition_build(build_id, status, BuildStatus.CANCELED,
                                                  reason=CANCELED_BY_USER)
                break
            except Conflict:
                continue  # dispatched (or requeued) meanwhile: cancel from its new state
        if build_id in self._dispatching:
            self._canceled.add(build_id)  # its package, if not sent yet, never is
        self._started_unrecorded.discard(build_id)
        self.metrics.build_finished(BuildStatus.CANCELED.value)
        if status is BuildStatus.RUNNING and build.worker:
            await self._stop_on_worker(build.worker, build_id)
            self._free(build.worker, build_id)
        return BuildStatus.CANCELED

    # -- watching workers ------------------------------------------------------------------

    async def check_workers(self) -> None:
        """One non-blocking pass: harvest finished checks, start due ones, declare losses.

        A worker is lost when its checks have failed, or one has gone unanswered,
        for ``scheduler.worker_lost_after_s``; at once when its actor is dead."""
        await self._settle_lost_workers()
        now = self._mono()
        period = self.settings.scheduler.health_check_period_s
        lost_after = self.settings.scheduler.worker_lost_after_s
        for hostname, link in list(self._links.items()):
            if link.check is not None and link.check.done():
                task, link.check = link.check, None
                try:
                    status = _worker_status(task.result())
                except WorkerGone:
                    await self.worker_lost(hostname, "actor died")
                    continue
                except Exception as e:  # noqa: BLE001 - timeouts, transient trouble, nonsense
                    log.info("health check of %s failed: %s %s", hostname, type(e).__name__, e)
                    link.failing_since = link.failing_since or link.check_started
                    self._set_health(hostname, False)
                else:
                    link.failing_since = None
                    self._set_health(hostname, True)
                    await self._reconcile(hostname, link, status, link.check_placements)
            if hostname not in self._links:
                continue
            silent_since = link.failing_since
            if link.check is not None:
                silent_since = min(silent_since or link.check_started, link.check_started)
            if silent_since is not None and now - silent_since > lost_after:
                await self.worker_lost(hostname, "no answer")
                continue
            if link.check is None and now >= link.next_check:
                link.next_check = now + period
                link.check_started = now
                link.check_placements = self._placements
                link.check = asyncio.ensure_future(self._call(link.client.status()))
        self._publish_gauges()
        await self.flush_mirrors()

    def _publish_gauges(self) -> None:
        by_status: dict[str, int] = {}
        running = 0
        for e in self.registry.workers():
            status = (WorkerStatus.for_load(e.load, e.build_limit) if e.healthy
                      else WorkerStatus.ERROR)
            by_status[status.value] = by_status.get(status.value, 0) + 1
            running += e.load
        self.metrics.workers(by_status)
        self.metrics.free_slots(self.registry.free_slots())
        self.metrics.running_builds(running)
        calls = self._calls()
        totals = {(target, "", method): (n["calls"], n["requests"])
                  for target in ("authority", "database")
                  for method, n in calls[target].items()}
        totals.update({("workers", host, method): (n["calls"], n["requests"])
                       for host, counts in calls["workers"].items()
                       for method, n in counts.items()})
        self.metrics.coalesced(self._call_counter.increments(totals))

    async def _reconcile(self, hostname: str, link: _Link, status: dict[str, Any],
                         asked_after: int) -> None:
        """Builds the DB has running here that the worker no longer runs: their final
        report was lost. After a grace they end as ``worker_lost`` (or go back to the
        queue if they never started); at once if the worker says it gave them up
        unstarted (held builds, ``worker.backlog``). ``status`` was asked for after
        ``asked_after`` placements: it says nothing of a build placed here since (one
        given up and placed here again, say, which it still names as given up)."""
        entry = self.registry.get(hostname)
        if entry is None:
            return
        for build_id in set(link.placed) - entry.running:
            del link.placed[build_id]
        alive = set(status.get("running", []))
        given_up = set(status.get("given_up", []))
        now = self._mono()
        grace = self.settings.scheduler.worker_lost_after_s
        for build_id in list(entry.running):
            if (build_id in alive or build_id in self._dispatching
                    or link.placed.get(build_id, 0) > asked_after):
                link.missing_since.pop(build_id, None)
                continue
            since = link.missing_since.setdefault(build_id, now)
            if now - since >= grace or build_id in given_up:
                link.missing_since.pop(build_id, None)
                try:
                    build = await self.store.get_build(build_id)
                except NotFound:
                    build = None
                if build is None or (build.status, build.worker) != (BuildStatus.RUNNING.value,
                                                                     hostname):
                    self.registry.release(hostname, build_id)  # moved on without us
                    continue
                await self._end_lost_build(build)

    def _set_health(self, hostname: str, healthy: bool) -> None:
        entry = self.registry.get(hostname)
        if entry is not None and entry.healthy != healthy:
            self.registry.set_health(hostname, healthy)

    async def end_overdue(self, *, force: bool = False) -> int:
        """End ``error``/``deadline_exceeded`` every running build past its timeout plus
        the token grace (``tokens.build_token_grace_s``) — its token has expired, so its
        worker can no longer end it — in either queue mode; tell its worker to stop it.
        Runs at most every :data:`OVERDUE_CHECK_S` unless ``force``. Returns how many."""
        mono = self._mono()
        if not force and mono < self._next_overdue_check:
            return 0
        self._next_overdue_check = mono + OVERDUE_CHECK_S
        now = self._now()
        grace = self.settings.tokens.build_token_grace_s
        ended = 0
        for build in await self.store.list_builds(status=[BuildStatus.RUNNING], limit=10_000):
            began = build.started_at or build.dispatched_at
            if began is None or (now - began).total_seconds() <= build.timeout_s + grace:
                continue
            if await self._end_running(
                    build.id, build.worker,
                    only_if={"worker": build.worker} if build.worker else None,
                    reason=DEADLINE_EXCEEDED,
                    message=f"no end was reported within the build's timeout "
                            f"({build.timeout_s} s) and {grace} s of grace"):
                ended += 1
                log.warning("build %d ran past its deadline on %s; ended", build.id,
                            build.worker)
        return ended

    async def set_worker_active(self, hostname: str, active: bool) -> None:
        """An admin (de)activates a worker: an inactive one gets no new builds (its
        running builds go on) and cannot register again until activated."""
        await self.store.update_worker(hostname, active=active)
        if hostname in self.registry:
            self.registry.set_active(hostname, active)

    async def checkin(self, hostname: str) -> bool:
        """A worker's periodic check-in; False tells it to register again."""
        if hostname not in self._links:
            return False
        self._mirror(hostname, last_checked_in=self._now())
        return True

    async def worker_left(self, hostname: str) -> None:
        """A drained worker leaves on purpose."""
        await self.worker_lost(hostname, "drained", final=WorkerStatus.IDLE)

    async def worker_lost(self, hostname: str, why: str,
                          final: WorkerStatus = WorkerStatus.ERROR) -> None:
        """Forget a dead worker: free its slots, end or requeue its builds (on a later
        watch pass, if the database does not answer now)."""
        link = self._links.pop(hostname, None)
        if link is not None and link.check is not None:
            link.check.cancel()
        self.registry.remove(hostname)
        self.stats.workers_lost += 1
        log.warning("worker %s lost (%s)", hostname, why)
        self._unsettled[hostname] = final
        await self._settle_lost_workers(hostname)

    async def _settle_lost_workers(self, *hostnames: str) -> None:
        for hostname in hostnames or list(self._unsettled):
            try:
                await self._settle_lost(hostname)
            except Exception as e:  # noqa: BLE001 - the next watch pass tries again
                log.warning("builds of lost worker %s not settled yet: %s", hostname,
                            type(e).__name__)

    async def _settle_lost(self, hostname: str) -> None:
        for build in await self.store.list_builds(status=[BuildStatus.RUNNING], worker=hostname,
                                                  limit=10_000):
            if hostname in self._links:
                return  # registered again meanwhile: its _adopt settles them
            if build.id not in self._dispatching:
                await self._end_lost_build(build)
        final = self._unsettled.get(hostname)
        if final is None or hostname in self._links:
            return
        try:
            await self.store.update_worker(hostname, status=final, running_builds=[])
        except NotFound:
            pass
        self._unsettled.pop(hostname, None)

    async def _end_lost_build(self, build: Build) -> None:
        """A build whose worker died: error if it had started, else back to the queue."""
        assert build.worker is not None
        if build.route in self._legacy_routes:
            return  # a legacy worker's build: the Scheduler never watched that worker
        try:
            # A start still being recorded (_record_start) counts: its steps may be running.
            if (build.started_at is None and build.id not in self._starting
                    and build.id not in self._started_unrecorded):
                moved = await self.store.transition_build(
                    build.id, BuildStatus.RUNNING, BuildStatus.PENDING,
                    only_if={"worker": build.worker}, worker=None, token_jti=None)
                await self.builds.enqueue(moved)
                self.stats.requeued += 1
            else:
                await self.store.transition_build(
                    build.id, BuildStatus.RUNNING, BuildStatus.ERROR,
                    only_if={"worker": build.worker}, reason=WORKER_LOST,
                    message=f"worker {build.worker} was lost while running the build")
                self.metrics.build_finished(BuildStatus.ERROR.value)
        except Conflict:
            pass
        self._started_unrecorded.discard(build.id)
        # Only now: should the database not answer, the slot keeps the build watched.
        self.registry.release(build.worker, build.id)

    def _mirror(self, hostname: str, **fields: Any) -> None:
        """Note a worker's row as changed; :meth:`flush_mirrors` writes it (one write
        per worker per watch pass, not one per dispatch and per finish)."""
        self._dirty.setdefault(hostname, {}).update(fields)

    async def flush_mirrors(self) -> None:
        """Write the registry's view of each changed worker to its row (what
        ``vela workers`` and the API show), at most a watch period late."""
        dirty, self._dirty = self._dirty, {}
        for hostname, fields in dirty.items():
            entry = self.registry.get(hostname)
            if entry is None:
                continue  # lost meanwhile: worker_lost wrote its row
            try:
                await self.store.update_worker(
                    hostname, status=WorkerStatus.for_load(entry.load, entry.build_limit),
                    running_builds=sorted(entry.running), **fields)
            except NotFound:
                pass
            except Exception:
                # Kept for the next pass; what changed since is newer and wins.
                self._dirty[hostname] = {**fields, **self._dirty.get(hostname, {})}
                raise

    # -- the queue's own losses -----------------------------------------------------------

    async def resync_queue(self) -> int:
        """Make the queue hold every pending build again: push the builds whose push
        failed (a queue outage), and every pending build if the back end may have lost
        its contents — Redis restarted empty (its run id changed), or this Scheduler
        is new and cannot know what Redis went through while it was down. A duplicate
        item is harmless: dispatch is a compare-and-set from ``pending``, so the second
        copy is acked as not pending. A durable queue (no epoch) never loses items."""
        try:
            epoch = await self.builds.queue.epoch()
        except Exception as e:  # noqa: BLE001 - unreachable now; the listener reports it
            log.debug("queue epoch unavailable: %s", e)
            return 0
        previous, self._queue_epoch = self._queue_epoch, epoch
        restarted = previous is not None and epoch != previous
        if epoch is None or not (restarted or self._queue_unknown):
            self._queue_unknown = False
            pushed, _ = await self.builds.enqueue_pending(unqueued_only=True,
                                                          skip=self._dispatching)
            if pushed:
                log.warning("queued %d pending builds that had no queue item", pushed)
            return pushed
        # Builds being dispatched included: the queue may have lost their items too,
        # and a dispatch that ends with the build still pending releases an item the
        # queue no longer has. A second item is harmless (retried, then not pending).
        pushed, complete = await self.builds.enqueue_pending(unqueued_only=False)
        self._queue_unknown = not complete
        log.warning("%s; re-queued %d pending builds",
                    "the queue back end restarted empty" if restarted
                    else "the Scheduler (re)started on a volatile queue", pushed)
        return pushed

    # -- restart -------------------------------------------------------------------------

    async def recover(self) -> None:
        """Rebuild the registry from the DB and live actors after a (re)start."""
        # Never registered in server mode: no actor name.
        workers = [w for w in await self.store.list_workers() if w.actor_name]
        # Asked all at once: each one that does not answer costs the call's timeout, and
        # every call to this Scheduler waits for its recovery.
        answers = await asyncio.gather(*(self._ask_after_restart(w) for w in workers))
        for worker, (client, status) in zip(workers, answers, strict=True):
            if client is None or status is None:
                self.registry.upsert(worker.hostname, routes=worker.routes,
                                     build_limit=worker.build_limit)
                await self.worker_lost(worker.hostname, "gone while the scheduler was down")
                continue
            self._links[worker.hostname] = _Link(
                client=client, sign_public_key=worker.sign_public_key,
                actor_name=worker.actor_name)
            self.registry.upsert(worker.hostname, routes=worker.routes,
                                 build_limit=worker.build_limit,
                                 backlog=_backlog(status),
                                 # Deactivated or draining: no new builds; its own go on.
                                 active=worker.active and not status.get("draining", False))
            await self._adopt(worker.hostname,
                              set(status.get("running", [])) - set(status.get("held", [])))
            self._mirror(worker.hostname, last_checked_in=self._now())
        # Running builds on workers we no longer know.
        for build in await self.store.list_builds(status=[BuildStatus.RUNNING], limit=10_000):
            if build.worker and build.worker not in self.registry:
                await self._end_lost_build(build)
        await self.resync_queue()

    async def _ask_after_restart(self, worker: Worker) -> tuple[Any, dict[str, Any] | None]:
        """A worker's client and its status; None for either that cannot be had."""
        client = await self.directory.connect(worker.hostname, worker.actor_name)
        if client is None:
            return None, None
        try:
            return client, _worker_status(await self._call(client.status()))
        except Exception as e:  # noqa: BLE001 - dead, unreachable or nonsense: lost
            log.info("worker %s did not answer after restart: %s %s", worker.hostname,
                     type(e).__name__, e)
            return client, None

    def status(self) -> dict[str, Any]:
        return {
            "workers": {
                e.hostname: {"routes": sorted(e.routes), "build_limit": e.build_limit,
                             "backlog": e.backlog, "running": sorted(e.running),
                             "healthy": e.healthy, "active": e.active}
                for e in self.registry.workers()},
            "free_slots": self.registry.free_slots(),
            "stats": {"dispatched": self.stats.dispatched, "requeued": self.stats.requeued,
                      "workers_lost": self.stats.workers_lost, "reports": self.stats.reports,
                      "refused": dict(self.stats.refused),
                      "report_rejections": dict(self.stats.report_rejections)},
            # Coalesced calls (vela.coalesce): how many requests each call carried.
            "calls": self._calls(),
        }

    def _calls(self) -> dict[str, Any]:
        return {"authority": _call_counts(self.authority),
                "database": self.store.call_counts(),
                "workers": {host: _call_counts(link.client)
                            for host, link in self._links.items()}}


def _call_counts(client: object) -> dict[str, dict[str, int]]:
    counts = getattr(client, "call_counts", None)  # clients that coalesce say so
    return counts() if callable(counts) else {}


def _worker_status(status: object) -> dict[str, Any]:
    """A worker's ``status`` reply, its build lists checked before the Scheduler reads
    them: one worker's nonsense (a bug, another version) fails its own check only."""
    if not isinstance(status, dict):
        raise ValueError(f"a status reply that is a {type(status).__name__}")
    for key in ("running", "held", "given_up"):
        ids = status.get(key, [])
        if not (isinstance(ids, list) and all(type(b) is int for b in ids)):
            raise ValueError(f"a status reply whose {key!r} is not a list of build ids")
    if not isinstance(status.get("draining", False), bool):
        raise ValueError("a status reply whose 'draining' is not true or false")
    return status


def _backlog(status: dict[str, Any]) -> int:
    """The backlog a worker's status names (0 from a worker that has none)."""
    backlog = status.get("backlog", 0)
    return backlog if isinstance(backlog, int) and 0 <= backlog <= MAX_BACKLOG else 0


def _reports_call(call: object) -> dict[str, Any]:
    if not (isinstance(call, dict) and set(call) == {"build_id", "token", "proof", "reports"}
            and isinstance(call["build_id"], int) and not isinstance(call["build_id"], bool)):
        raise Rejected(Reason.MALFORMED, "a call is build_id, token, proof and reports")
    return call


def _signed_reports(signed: object) -> dict[str, Any]:
    """A worker's ``{reports, proof}`` (the start in a receipt), or ``malformed``."""
    if not (isinstance(signed, dict) and set(signed) == {"proof", "reports"}):
        raise Rejected(Reason.MALFORMED, "signed reports are reports and their proof")
    return signed
