"""The worker's plain-code heart: accept sealed packages, run them, report back.

:class:`WorkerCore` is what the WorkerActor wraps. It opens a package only if
the server signed it for this worker, keeps at most ``build_limit`` builds
running (and up to ``backlog`` more held until a slot frees), and reports each
build's progress to the server through a :class:`ServerLink` with the build's
token and a fresh proof of possession per call. It never raises to the server
over a refusal: it answers with a :class:`Receipt` whose ``reason`` is a stable
code.

What happens once a build is here (slots, the build task, ordered reports
with retries) is :class:`BuildRunner`, shared with the legacy worker
(:mod:`vela.legacy.worker`), which differs only in how a build arrives and
how a report is authenticated.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from vela.domain import BuildStatus, StepStatus
from vela.executor import BuildResult, Runtime, run_build
from vela.pipeline import Executable, PipelineError
from vela.security import (
    PROOF_ONLY,
    BuildAction,
    Challenge,
    OpenedPackage,
    Purpose,
    Reason,
    Rejected,
    WorkerIdentity,
    answer_challenge,
    make_proof,
    open_package,
)
from vela.security._codec import timestamp

log = logging.getLogger("vela.worker")

# Refusal codes of our own, beside the security Reason values.
NO_FREE_SLOT = "no_free_slot"
DRAINING = "draining"
DUPLICATE_PACKAGE = "duplicate_package"
ALREADY_RUNNING = "already_running"
STOPPED_BEFORE = "stopped_before_it_came"
# FINISH reasons the worker adds to the executor's.
INVALID_EXECUTABLE = "invalid_executable"
WORKER_ERROR = "worker_error"

# Why a build's reports were cut off, beside a security Reason value.
UNREACHABLE = "unreachable"
CLOSED = "closed"
# How long close() lets builds stop by themselves before cancelling their tasks.
CLOSE_GRACE_S = 10.0
# Most reports on one build sent in one call (the server takes up to 64).
REPORT_BATCH = 32
# How long a step's report waits for the next one to travel with it.
REPORT_LINGER_S = 0.05
# Held builds given up, remembered for the server's health checks to see.
MAX_GIVEN_UP = 1000
# Package ids remembered until their package expires; far above what a worker
# can receive within one package lifetime.
MAX_SEEN_PACKAGES = 10_000
# A job that names no timeout and has no token deadline (not sent by our servers).
DEFAULT_BUILD_TIMEOUT_S = 3600.0
_META_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Not passed on as VELA_* variables: the worker sets the first itself, the
# second is a limit, not a fact about the build.
_META_SKIP = frozenset({"build_id", "timeout_s"})


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ServerLink(Protocol):
    async def send_reports(self, *, build_id: int, token: str, proof: str,
                           reports: list[dict[str, Any]]) -> None:
        """Deliver a build's reports in order (each ``{action, payload}``) with one proof
        over all of them. Raises
        vela.security.Rejected when the server refuses (token revoked, build ended...);
        any other exception means transient trouble (retry)."""


@dataclass(frozen=True)
class Receipt:
    """The answer to ``execute_package``; crosses Ray as :meth:`as_dict`."""

    accepted: bool
    build_id: int | None
    # A stable code when refused: a security Reason value, or one of
    # "no_free_slot", "draining", "duplicate_package", "already_running".
    reason: str | None = None
    message: str | None = None
    # When accepted into a free slot: the build's ``build.start`` report with its proof
    # (``{reports, proof}``), which travels back with the receipt instead of in a report
    # call of its own.
    # None when the package is held for a slot: the build reports its start itself.
    start: dict[str, Any] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Job:
    """A build ready to run here, however it arrived: opened from a sealed package,
    or (legacy mode) claimed from the queue and fetched with the worker secret."""

    build_id: int
    build: dict[str, Any]  # metadata: repo, number, route, timeout_s (→ VELA_* variables)
    executable: str
    secrets: dict[str, str] = field(repr=False)
    # Epoch seconds: the most the server will listen (the build token's expiry).
    deadline: float | None = None

    @classmethod
    def from_package(cls, opened: OpenedPackage) -> Job:
        return cls(build_id=opened.build_id, build=opened.build,
                   executable=opened.executable, secrets=opened.secrets,
                   deadline=opened.claims.exp)


@dataclass(eq=False)
class _Run:
    """One build on this worker, from the reserved slot to the end of its task."""

    build_id: int
    token: str = field(repr=False)
    cancel: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    # Reports made and not yet delivered, in order; one sender task drains them.
    outbox: list[tuple[BuildAction, dict[str, Any]]] = field(default_factory=list, repr=False)
    sender: asyncio.Task[None] | None = field(default=None, repr=False)
    # Set when a report that must not wait is queued (start, finish, a full outbox).
    urgent: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # Why reports stopped (a Reason value, UNREACHABLE or CLOSED); None while they flow.
    cut_off: str | None = None
    # When the build started here, if its build.start report came with the receipt
    # (the server has it already); None: the build reports its start itself.
    started_at: str | None = None
    # Its steps are over and only its end is being reported: it holds no slot (the
    # server frees the slot when it writes the end, and may offer it again at once).
    finishing: bool = False
    # While it is held for a slot (the worker's backlog): the event that hands it one.
    slot: asyncio.Event | None = field(default=None, repr=False)


class _BuildReporter:
    """The executor's Reporter for one build: every call becomes a server report."""

    def __init__(self, core: BuildRunner, run: _Run) -> None:
        self._core = core
        self._run = run
        # Chunks are numbered per step, so a report retried after its reply was lost
        # (the server wrote it) is not written twice.
        self._chunks: dict[int, int] = {}

    async def step_started(self, number: int, name: str) -> None:
        await self._core._queue(self._run, BuildAction.STEP_UPDATE, {
            "number": number, "status": StepStatus.RUNNING.value,
            "started_at": self._core._iso_now()})

    async def step_finished(self, number: int, status: StepStatus, exit_code: int | None,
                            reason: str | None) -> None:
        await self._core._queue(self._run, BuildAction.STEP_UPDATE, {
            "number": number, "status": StepStatus(status).value, "exit_code": exit_code,
            "reason": None if reason is None else str(reason),
            "finished_at": self._core._iso_now()})

    async def log(self, number: int, lines: list[str]) -> None:
        seq = self._chunks[number] = self._chunks.get(number, 0) + 1
        await self._core._queue(self._run, BuildAction.LOG_APPEND,
                                {"number": number, "seq": seq, "lines": list(lines)})


class BuildRunner:
    """Slots, build tasks and ordered, retried reports: what a worker does with a
    build once it has one, in either queue mode. A subclass says how a report is
    authenticated (:meth:`_send`)."""

    def __init__(self, *, hostname: str, routes: list[str], build_limit: int,
                 runtime: Runtime, workspace_root: Path, backlog: int = 0,
                 clock: Callable[[], datetime] = _utcnow, batch_lines: int = 100,
                 flush_s: float = 0.5, report_retry_s: float = 0.2,
                 report_deadline_s: float = 300.0) -> None:
        if build_limit < 1:
            raise ValueError("build_limit must be at least 1")
        if backlog < 0:
            raise ValueError("backlog must not be negative")
        if report_retry_s <= 0 or report_deadline_s <= 0:
            raise ValueError("report_retry_s and report_deadline_s must be positive")
        self.hostname = hostname
        self.routes = list(routes)
        self.build_limit = build_limit
        self.backlog = backlog
        self.runtime = runtime
        self.workspace_root = Path(workspace_root)
        self._clock = clock
        self._batch_lines = batch_lines
        self._flush_s = flush_s
        self._retry_s = report_retry_s
        self._deadline_s = report_deadline_s
        self._linger_s = REPORT_LINGER_S
        self._runs: dict[int, _Run] = {}
        # Held builds dropped unstarted, latest last: the server queues them again.
        self._given_up: collections.deque[int] = collections.deque(maxlen=MAX_GIVEN_UP)
        # Builds the server stopped before their package came (it can overtake the
        # package on the way): such a package is refused, not started.
        self._stopped: collections.deque[int] = collections.deque(maxlen=MAX_GIVEN_UP)
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(hostname={self.hostname!r}, running={self.running}, "
                f"free_slots={self.free_slots}, draining={self._draining})")

    # -- state ---------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        """How many more builds this worker takes now: free slots and backlog room."""
        if self._draining:
            return 0
        taken = sum(1 for run in self._runs.values() if not run.finishing)
        return max(self.build_limit + self.backlog - taken, 0)

    def _slot_free(self) -> bool:
        active = sum(1 for run in self._runs.values()
                     if not run.finishing and run.slot is None)
        return active < self.build_limit

    @property
    def running(self) -> list[int]:
        """Every build here, held ones included."""
        return sorted(self._runs)

    @property
    def held(self) -> list[int]:
        """Builds accepted and waiting for a slot (the backlog)."""
        return sorted(run.build_id for run in self._runs.values() if run.slot is not None)

    @property
    def started(self) -> list[int]:
        """Builds here that are not held: what a worker tells a server it (re)attaches
        to. That server queues the held ones again (their starts are then refused)."""
        return sorted(run.build_id for run in self._runs.values() if run.slot is None)

    @property
    def draining(self) -> bool:
        return self._draining

    def status(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "routes": list(self.routes),
                "build_limit": self.build_limit, "backlog": self.backlog,
                "running": self.running, "held": self.held,
                "given_up": list(self._given_up),
                "free_slots": self.free_slots, "draining": self._draining}

    # -- builds ------------------------------------------------------------------------

    def _start(self, job: Job, token: str = "", *, started_at: str | None = None,
               held: bool = False) -> _Run:
        """Take a slot (or, ``held``, a place in the backlog) and run ``job`` in the
        background; the caller checked that there is room and the build is not here,
        with no await since. With ``started_at`` the build does not report its start
        (the caller handed it over)."""
        run = _Run(build_id=job.build_id, token=token, started_at=started_at)
        if job.build_id in self._given_up:  # here again: no longer given up
            self._given_up.remove(job.build_id)
        if held:
            run.slot = asyncio.Event()
        self._runs[job.build_id] = run
        self._idle.clear()
        run.task = asyncio.create_task(self._drive(run, job), name=f"vela-build-{job.build_id}")
        run.task.add_done_callback(lambda task: self._ended(run, task))
        log.info("build %s accepted%s", job.build_id, " (held for a slot)" if held else "")
        return run

    def cancel(self, build_id: int) -> bool:
        """Ask a running build to stop (it ends ``canceled``); False if not running here,
        and then its package, should it come later, is refused."""
        run = self._runs.get(build_id)
        if run is None:
            self._stopped.append(build_id)
            return False
        run.cancel.set()
        return True

    async def wait_idle(self, timeout_s: float | None = None) -> None:
        """Return once no build runs here; TimeoutError after ``timeout_s``."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Take no new builds and wait for the running ones to end (TimeoutError
        after ``timeout_s``; they keep running)."""
        self._draining = True
        await self.wait_idle(timeout_s)

    async def close(self) -> None:
        """Stop now: take nothing new, stop every running build without reporting
        further (the server notices the worker is gone) and wait for their tasks."""
        self._draining = True
        runs = list(self._runs.values())
        for run in runs:
            run.cut_off = run.cut_off or CLOSED
            run.cancel.set()
        tasks = [run.task for run in runs if run.task is not None]
        if not tasks:
            return
        # The executor stops the steps and removes the workspace on its own; cutting a
        # build's task short is for a report still hanging on the server link.
        _, stuck = await asyncio.wait(tasks, timeout=CLOSE_GRACE_S)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one build ---------------------------------------------------------------------

    async def _drive(self, run: _Run, job: Job) -> None:
        try:
            if run.slot is not None and not await self._wait_for_slot(run, job):
                return
            if run.started_at is None and not await self._report(
                    run, BuildAction.START, {"started_at": self._iso_now()}):
                log.info("build %s not started: the server did not take its start", run.build_id)
                return
            status, reason, message = await self._execute(run, job)
            run.finishing = True
            self._hand_slots()
            await self._report(run, BuildAction.FINISH, {
                "status": status.value, "reason": reason, "message": message,
                "finished_at": self._iso_now()})
            log.info("build %s ended %s%s", run.build_id, status.value,
                     f" ({reason})" if reason else "")
        finally:
            if run.sender is not None:
                run.sender.cancel()  # only if this task was cut short: it is done otherwise
            self._release(run)

    async def _wait_for_slot(self, run: _Run, job: Job) -> bool:
        """Hold a build until a slot frees; False if it is given up unstarted instead:
        canceled, the worker closing, or held for half the slack its token has beyond
        the build's timeout (the other half is for its reports). A build given up
        reports nothing: the server sees it listed as given up in this worker's status
        and queues it again."""
        slot = run.slot
        assert slot is not None
        wait_s = None
        limit = _timeout_given(job)
        if job.deadline is not None and limit is not None:
            wait_s = max((job.deadline - limit - timestamp(self._clock())) / 2, 0.0)
        waits = [asyncio.ensure_future(slot.wait()), asyncio.ensure_future(run.cancel.wait())]
        try:
            await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if slot.is_set() and not run.cancel.is_set():
            return True
        self._given_up.append(run.build_id)
        log.info("build %s given up before it started (%s)", run.build_id,
                 "stopped" if run.cancel.is_set() else "no slot freed in time")
        return False

    def _hand_slots(self) -> None:
        """Give free slots to held builds, first come first served (runs are kept in
        the order they arrived)."""
        for run in self._runs.values():
            if run.slot is None:
                continue
            if not self._slot_free():
                return
            slot, run.slot = run.slot, None
            slot.set()

    async def _execute(self, run: _Run,
                       job: Job) -> tuple[BuildStatus, str | None, str | None]:
        try:
            executable = Executable.from_json(job.executable)
        except PipelineError:
            return (BuildStatus.ERROR, INVALID_EXECUTABLE,
                    "the build's executable does not parse on this worker")
        try:
            result: BuildResult = await run_build(
                executable, meta=_meta(job), secrets=job.secrets, runtime=self.runtime,
                reporter=_BuildReporter(self, run), workspace_root=self.workspace_root,
                build_timeout_s=self._build_timeout_s(job), cancel=run.cancel,
                batch_lines=self._batch_lines, flush_s=self._flush_s)
        except Exception as e:
            log.error("build %s: the worker failed running it (%s)", run.build_id,
                      type(e).__name__, exc_info=True)
            return (BuildStatus.ERROR, WORKER_ERROR,
                    f"the worker failed running the build ({type(e).__name__})")
        return (result.status, None if result.reason is None else result.reason.value,
                result.message)

    def _build_timeout_s(self, job: Job) -> float:
        limit = _timeout_given(job)
        if limit is not None:
            return limit
        if job.deadline is None:
            return DEFAULT_BUILD_TIMEOUT_S
        # No limit given: the token's lifetime is the most the server will listen.
        return max(job.deadline - timestamp(self._clock()), 1.0)

    async def _report(self, run: _Run, action: BuildAction, payload: dict[str, Any]) -> bool:
        """Queue a report and wait until it and every report before it got through;
        False if they did not (the build is then cut off)."""
        await self._queue(run, action, payload, urgent=True)
        if run.sender is not None:
            await asyncio.shield(run.sender)
        return run.cut_off is None

    async def _queue(self, run: _Run, action: BuildAction, payload: dict[str, Any], *,
                     urgent: bool = False) -> None:
        """Queue a report without waiting for it: the sender delivers the queue in
        order, several reports per call. Waits only while the queue is full."""
        if run.cut_off is not None:
            return
        run.outbox.append((action, payload))
        if urgent or len(run.outbox) >= REPORT_BATCH:
            run.urgent.set()
        if run.sender is None or run.sender.done():
            run.sender = asyncio.create_task(self._send_queued(run),
                                             name=f"vela-reports-{run.build_id}")
        if len(run.outbox) > 2 * REPORT_BATCH:  # the server is slower than the build
            await asyncio.shield(run.sender)

    async def _send_queued(self, run: _Run) -> None:
        """Deliver the queue. A report that may wait (a step's, a log chunk) lingers up to
        :data:`REPORT_LINGER_S` for the next, so a short step's reports travel together."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.urgent.wait(), self._linger_s)
        while run.outbox and run.cut_off is None:
            run.urgent.clear()
            batch = run.outbox[:REPORT_BATCH]
            if await self._deliver(run, batch):
                del run.outbox[:len(batch)]
        run.outbox.clear()

    async def _deliver(self, run: _Run, batch: list[tuple[BuildAction, dict[str, Any]]]
                       ) -> bool:
        """Send reports, retrying transient trouble; False if they did not get through.

        A refusal means the server no longer wants this build here (canceled, ended,
        dispatched again): the build is stopped and reports no more. So is a server
        unreachable for ``report_deadline_s``. A refusal of the proofs alone
        (:data:`~vela.security.errors.PROOF_ONLY`) is retried like trouble, with fresh
        proofs.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deadline_s
        delay = self._retry_s
        while run.cut_off is None:
            try:
                await self._send(run, batch)
                return True
            except Rejected as e:
                if e.reason not in PROOF_ONLY:
                    log.info("build %s: server refused %s (%s); stopping the build",
                             run.build_id, "+".join(a.value for a, _ in batch),
                             e.reason.value)
                    self._cut_off(run, e.reason.value)
                    break
                # The proofs, not the build, were refused: made before the server's
                # TokenAuthority restarted (its replay window starts anew), say. The
                # next attempt signs them afresh.
                failure, give_up_as = f"proofs refused: {e.reason.value}", e.reason.value
            except Exception as e:  # noqa: BLE001 - transient by the link's contract
                failure, give_up_as = type(e).__name__, UNREACHABLE
            if loop.time() + delay > deadline:
                log.warning("build %s: server unreachable for %.0fs (%s); stopping the "
                            "build", run.build_id, self._deadline_s, failure)
                self._cut_off(run, give_up_as)
                break
            log.debug("build %s: reports failed (%s); retrying", run.build_id, failure)
            await asyncio.sleep(delay)  # backoff, not synchronisation
            delay = min(delay * 2, max(self._retry_s, 5.0))
        return False

    async def _send(self, run: _Run, batch: list[tuple[BuildAction, dict[str, Any]]]
                    ) -> None:
        """One attempt at delivering reports, in order; raises like
        :meth:`ServerLink.send_reports`. Reports a lost reply hid are sent again, which the
        server takes as the no-ops they are."""
        raise NotImplementedError

    @staticmethod
    def _cut_off(run: _Run, why: str) -> None:
        run.cut_off = why
        run.cancel.set()

    def _ended(self, run: _Run, task: asyncio.Task[None]) -> None:
        # Also frees the slot of a task cancelled before it ever ran.
        self._release(run)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("build %s: its task failed (%s)", run.build_id, type(error).__name__,
                      exc_info=error)

    def _release(self, run: _Run) -> None:
        if self._runs.get(run.build_id) is run:
            del self._runs[run.build_id]
        self._hand_slots()
        if not self._runs:
            self._idle.set()

    # -- helpers ---------------------------------------------------------------------

    def _iso_now(self) -> str:
        return self._clock().isoformat()


class WorkerCore(BuildRunner):
    """Accepts packages, runs builds, reports; the WorkerActor is a shell around it."""

    def __init__(self, *, hostname: str, routes: list[str], build_limit: int,
                 identity: WorkerIdentity, pinned_server_keys: Mapping[str, str],
                 runtime: Runtime, server: ServerLink, workspace_root: Path,
                 backlog: int = 0, clock: Callable[[], datetime] = _utcnow,
                 batch_lines: int = 100, flush_s: float = 0.5, report_retry_s: float = 0.2,
                 report_deadline_s: float = 300.0,
                 refresh_server_keys: Callable[[], Awaitable[Mapping[str, str] | None]]
                 | None = None) -> None:
        super().__init__(hostname=hostname, routes=routes, build_limit=build_limit,
                         runtime=runtime, workspace_root=workspace_root, backlog=backlog,
                         clock=clock, batch_lines=batch_lines, flush_s=flush_s,
                         report_retry_s=report_retry_s, report_deadline_s=report_deadline_s)
        self._identity = identity
        self._pinned: dict[str, str] = dict(pinned_server_keys)
        # After a rotation: the server keys pinned now, fetched anew if allowed
        # (ServerKeys.refresh); None: none pinned.
        self._refresh_server_keys = refresh_server_keys
        self._server = server
        self._seen: dict[str, float] = {}  # package_id -> its expiry (epoch seconds)

    def pin(self, keys: Mapping[str, str]) -> None:
        """Trust these server keys (kid -> public key) from now on, and only these."""
        self._pinned = dict(keys)

    # -- the protocol ----------------------------------------------------------------

    def availability(self, challenge: dict[str, Any] | Challenge) -> dict[str, Any]:
        """The signed answer to a server's dispatch challenge, carrying the free slots.

        Only a dispatch challenge: whoever can call this worker must not get its
        signature on another purpose's (a re-registration would then need no key)."""
        if not isinstance(challenge, Challenge):
            try:
                # Through JSON: the wire form holds enum values as strings, which the
                # strict model takes from JSON only.
                challenge = Challenge.model_validate_json(json.dumps(challenge))
            except (TypeError, ValueError, ValidationError):
                raise Rejected(Reason.MALFORMED, "not a challenge") from None
        if challenge.purpose is not Purpose.DISPATCH:
            raise Rejected(Reason.CHALLENGE_MISMATCH,
                           f"a {challenge.purpose.value} challenge is not answered here")
        answer = answer_challenge(challenge, identity=self._identity, hostname=self.hostname,
                                  free_slots=self.free_slots)
        return answer.model_dump(mode="json")

    async def execute_package(self, package: dict[str, Any]) -> Receipt:
        """Open ``package`` and start its build in the background; never raises.

        An accepted receipt carries the build's ``build.start`` report, proof and all:
        the server records it before it takes any later report on the build (one
        call fewer per build, and the build does not wait for it). When every slot is
        taken, up to ``backlog`` packages are held instead and started as slots free;
        their receipts carry no start (the build reports it when it starts).
        Everything up to reserving the slot happens without an await (:meth:`_accept`),
        so calls made concurrently cannot take more than ``build_limit`` slots (and the
        backlog). A package signed by a key not pinned here (the server rotated its
        key) is tried once more, from the start, if the server's key set could be
        fetched and pinned anew meanwhile.
        """
        tried = self._pinned
        receipt = self._accept(package)
        if receipt.reason == Reason.PACKAGE_UNKNOWN_SIGNER.value \
                and self._refresh_server_keys is not None:
            keys = await self._refresh_server_keys()
            if keys is not None and dict(keys) != tried:
                self.pin(keys)
                receipt = self._accept(package)
        return receipt

    def _accept(self, package: dict[str, Any]) -> Receipt:
        claimed = package.get("build_id") if isinstance(package, dict) else None
        claimed_id = claimed if isinstance(claimed, int) and not isinstance(claimed, bool) \
            else None
        if self._draining:
            return Receipt(False, claimed_id, DRAINING,
                           f"worker {self.hostname} is draining and takes no new builds")
        now = self._clock()
        try:
            opened = open_package(package, identity=self._identity,
                                  pinned_server_keys=self._pinned, hostname=self.hostname,
                                  now=now)
        except Rejected as e:
            log.info("package refused: %s", e.reason.value)
            return Receipt(False, claimed_id, e.reason.value, str(e))
        except Exception as e:  # noqa: BLE001 - a refusal, whatever broke
            log.warning("package refused: cannot open it (%s)", type(e).__name__)
            return Receipt(False, claimed_id, Reason.MALFORMED.value,
                           "the package could not be opened")
        build_id = opened.build_id
        if not self._remember(opened.package_id, timestamp(opened.expires_at), now):
            log.info("package refused: %s (build %s)", DUPLICATE_PACKAGE, build_id)
            return Receipt(False, build_id, DUPLICATE_PACKAGE,
                           "this package was already received; packages are single use")
        if build_id in self._stopped:
            return Receipt(False, build_id, STOPPED_BEFORE,
                           f"build {build_id} was stopped before its package came")
        if build_id in self._runs:
            return Receipt(False, build_id, ALREADY_RUNNING,
                           f"build {build_id} is already running on {self.hostname}")
        if self.free_slots <= 0:
            return Receipt(False, build_id, NO_FREE_SLOT,
                           f"all {self.build_limit} build slots of {self.hostname} are in use"
                           + (f" and its backlog of {self.backlog} is full" if self.backlog
                              else ""))
        if not self._slot_free():
            self._start(Job.from_package(opened), token=opened.build_token, held=True)
            return Receipt(True, build_id)
        started_at = now.isoformat()
        self._start(Job.from_package(opened), token=opened.build_token, started_at=started_at)
        return Receipt(True, build_id, start=self._signed(
            opened.build_token, build_id, [(BuildAction.START, {"started_at": started_at})],
            now))

    def start_report(self, build_id: int) -> dict[str, Any] | None:
        """The ``build.start`` report of a build whose start came with its receipt, with a
        fresh proof: for the server when the receipt's proof went stale before it could
        record it (its TokenAuthority restarted meanwhile, say). None if the build does
        not run here or its reports were cut off."""
        run = self._runs.get(build_id)
        if run is None or run.started_at is None or run.cut_off is not None:
            return None
        return self._signed(run.token, build_id,
                            [(BuildAction.START, {"started_at": run.started_at})],
                            self._clock())

    async def _send(self, run: _Run, batch: list[tuple[BuildAction, dict[str, Any]]]
                    ) -> None:
        # A fresh proof per call and attempt: the server refuses a proof it has seen.
        await self._server.send_reports(build_id=run.build_id, token=run.token,
                                        **self._signed(run.token, run.build_id, batch,
                                                       self._clock()))

    def _signed(self, token: str, build_id: int,
                batch: list[tuple[BuildAction, dict[str, Any]]], now: datetime
                ) -> dict[str, Any]:
        """Reports as sent: ``{reports: [{action, payload}...], proof}``, the proof over
        all of them in this order."""
        reports = [(action.value, payload) for action, payload in batch]
        return {"reports": [{"action": a, "payload": p} for a, p in reports],
                "proof": make_proof(self._identity, token=token, reports=reports,
                                    build_id=build_id, now=now)}

    def _remember(self, package_id: str, expires_at: float, now: datetime) -> bool:
        """Record a package id; False if it was seen before (a replay)."""
        t = timestamp(now)
        for pid in [p for p, exp in self._seen.items() if exp <= t]:
            del self._seen[pid]  # expired packages are refused as such anyway
        if package_id in self._seen:
            return False
        if len(self._seen) >= MAX_SEEN_PACKAGES:
            del self._seen[min(self._seen, key=self._seen.__getitem__)]
        self._seen[package_id] = expires_at
        return True


def _timeout_given(job: Job) -> float | None:
    """The build's own timeout in seconds, if its metadata names one."""
    limit = job.build.get("timeout_s")
    if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0:
        return float(limit)
    return None


def _meta(job: Job) -> dict[str, str]:
    """The build's metadata as the executor's ``meta`` (→ ``VELA_*`` variables)."""
    meta = {key: str(value) for key, value in job.build.items()
            if key not in _META_SKIP and _META_KEY.fullmatch(key)
            and isinstance(value, str | int) and not isinstance(value, bool)}
    meta["build_id"] = str(job.build_id)
    return meta
