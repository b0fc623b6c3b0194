"""Writing a worker's reports on its build: the one write path for status, steps and logs.

Who may report is decided by two checks: the Scheduler asks
:meth:`~vela.server.authority.Authority.verify` for the build token and the call's
proof (over its reports), and hands the token's claims here, where they are checked
against the build's row (:func:`~vela.security.authorize_all`) in the transaction
that writes the reports. The legacy gateway checks the shared worker secret instead
(:mod:`vela.legacy`). Either way a build's record looks the same whichever queue
mode ran it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from vela.db.store import Store, Writes
from vela.domain import BuildStatus, StepStatus
from vela.errors import Conflict, InvalidTransition, NotFound
from vela.metrics import Metrics
from vela.security import BuildAction, BuildClaims, Reason, Rejected, authorize_all

MAX_LOG_LINES = 5_000
MAX_LOG_LINE_CHARS = 64_000
MAX_MESSAGE_CHARS = 2_000
# Reports a worker may send in one call (its queue for one build, in order).
MAX_BATCH = 64


def _utcnow() -> datetime:
    return datetime.now(UTC)


def storable(text: str, limit: int) -> str:
    """``text`` as the database can hold it: no NUL (PostgreSQL's text refuses it, and a
    step may print binary), at most ``limit`` characters. A report is never refused for
    what a step printed or how long the reason for an end is: that would lose the build's
    end, and the worker would retry a write that can never succeed."""
    return text[:limit].replace("\x00", "\ufffd")


def _storable(limit: int) -> BeforeValidator:
    return BeforeValidator(lambda v: storable(v, limit) if isinstance(v, str) else v)


class _Report(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StepReport(_Report):
    number: int = Field(ge=1, le=10_000)
    status: StepStatus
    exit_code: int | None = Field(default=None, ge=-1024, le=1024)
    reason: str | None = Field(default=None, max_length=64)


class LogReport(_Report):
    number: int = Field(ge=1, le=10_000)
    # The worker's chunk number within the step: a retried chunk is written once.
    # Absent (legacy workers), the server numbers chunks as they come.
    seq: int | None = Field(default=None, ge=1, le=10_000_000)
    lines: list[str] = Field(max_length=MAX_LOG_LINES)


class FinishReport(_Report):
    status: BuildStatus
    reason: str | None = Field(default=None, max_length=64)
    message: Annotated[str, _storable(MAX_MESSAGE_CHARS)] | None = None


class BatchedReport(_Report):
    action: str = Field(max_length=64)
    payload: dict[str, Any]


def _where(e: ValidationError) -> str:
    """Where the first problem is, e.g. ``lines.3`` (never the offending value)."""
    return ".".join(str(p) for p in e.errors()[0]["loc"])


def parse_batch(reports: object) -> list[BatchedReport]:
    """A worker's reports on one build, sent together in the order made: 1 to
    :data:`MAX_BATCH` of them, ``build.start`` only first, ``build.finish`` only last
    (nothing may follow the end of a build). Anything else is ``malformed``."""
    if not isinstance(reports, list) or not 1 <= len(reports) <= MAX_BATCH:
        raise Rejected(Reason.MALFORMED, f"send 1 to {MAX_BATCH} reports at a time")
    try:
        batch = [BatchedReport.model_validate(r) for r in reports]
    except ValidationError as e:
        raise Rejected(Reason.MALFORMED, f"report: {_where(e)}") from None
    actions = [r.action for r in batch]
    if BuildAction.START in actions[1:] or BuildAction.FINISH in actions[:-1]:
        raise Rejected(Reason.MALFORMED, "build.start may only come first and "
                       "build.finish only last")
    return batch


class ReportWriter:
    def __init__(self, store: Store, *, metrics: Metrics | None = None,
                 now: Callable[[], datetime] = _utcnow) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self._now = now

    async def apply(self, *, build_id: int, hostname: str, action: str,
                    payload: dict[str, Any]) -> bool:
        """Record one already authorized report; True if it ended the build."""
        return await self.apply_all(build_id=build_id, hostname=hostname,
                                    reports=[(action, payload)])

    async def apply_all(self, *, build_id: int, hostname: str,
                        reports: Sequence[tuple[str, dict[str, Any]]],
                        claims: BuildClaims | None = None) -> bool:
        """Record reports, in order, in one transaction (shared with other builds'
        reports written at the same moment: :meth:`Store.write_shared`): all of them
        or none. True if they ended the build.

        With ``claims`` (of a build token whose requests were verified) each report is
        first authorized against the build's row, read in this transaction (locked on
        PostgreSQL): running, on ``claims.wkr``, with the token's ``jti``. Without, the
        caller authorized them. A payload that does not parse, or a step or status
        change that cannot happen, is refused as ``malformed``.
        """
        def unit(w: Writes) -> BuildStatus | None:
            if claims is not None:
                row = w.token_row(build_id)
                if row is None:
                    raise Rejected(Reason.WRONG_BUILD, f"no build {build_id}")
                authorize_all(claims, [action for action, _ in reports], build_id=build_id,
                              build_status=row.status, build_worker=row.worker,
                              build_token_jti=row.token_jti)
            ended: BuildStatus | None = None
            for action, payload in reports:
                try:
                    ended = self._one(w, build_id, hostname, action, payload) or ended
                except ValidationError as e:
                    raise Rejected(Reason.MALFORMED, f"{action} payload: {_where(e)}") from None
            return ended

        try:
            ended = await self.store.write_shared(unit)
        except NotFound as e:
            raise Rejected(Reason.MALFORMED, str(e)) from None
        if ended is not None:
            self.metrics.build_finished(ended.value)
        return ended is not None

    def _one(self, w: Writes, build_id: int, hostname: str, action: str,
             payload: dict[str, Any]) -> BuildStatus | None:
        if action == BuildAction.START:
            w.set_build_fields(build_id, started_at=self._now())
        elif action == BuildAction.STEP_UPDATE:
            self._step(w, build_id, StepReport.model_validate(payload))
        elif action == BuildAction.LOG_APPEND:
            logs = LogReport.model_validate(payload)
            lines = [storable(line, MAX_LOG_LINE_CHARS) for line in logs.lines]
            if lines:
                w.append_log(build_id, logs.number, lines, seq=logs.seq)
        elif action == BuildAction.FINISH:
            return self._finish(w, build_id, hostname, FinishReport.model_validate(payload))
        else:
            raise Rejected(Reason.FORBIDDEN_ACTION, f"{str(action)[:40]!r}")
        return None

    def _step(self, w: Writes, build_id: int, r: StepReport) -> None:
        try:
            w.update_step(build_id, r.number, r.status, exit_code=r.exit_code,
                          reason=r.reason)
        except (InvalidTransition, Conflict):
            # A retried report that already took effect is fine; anything else is not.
            if w.step_status(build_id, r.number) != r.status.value:
                raise Rejected(Reason.MALFORMED, f"step {r.number} cannot become "
                               f"{r.status.value}") from None

    def _finish(self, w: Writes, build_id: int, hostname: str,
                r: FinishReport) -> BuildStatus | None:
        if not r.status.terminal:
            raise Rejected(Reason.MALFORMED, f"{r.status.value} is not a final status")
        try:
            w.transition_build(build_id, BuildStatus.RUNNING, r.status,
                               only_if={"worker": hostname}, reason=r.reason,
                               message=r.message)
        except Conflict:
            return None  # ended meanwhile (canceled, lost): the first end stands
        return r.status
