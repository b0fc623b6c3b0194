"""Writing a worker's reports on its build: the one write path for status, steps and logs.

Who may report is decided before this runs, elsewhere: the Scheduler asks
:meth:`~vela.server.authority.Authority.authorize` (build token + proof), the
legacy gateway checks the shared worker secret (:mod:`vela.legacy`). Both
then hand the checked report to :class:`ReportWriter`, so a build's record
looks the same whichever queue mode ran it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vela.db.store import Store, Writes
from vela.domain import BuildStatus, StepStatus
from vela.errors import Conflict, InvalidTransition, NotFound
from vela.metrics import Metrics
from vela.security import BuildAction, Reason, Rejected

MAX_LOG_LINES = 5_000
MAX_LOG_LINE_CHARS = 64_000
# Reports a worker may send in one call (its queue for one build, in order).
MAX_BATCH = 64


def _utcnow() -> datetime:
    return datetime.now(UTC)


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
    message: str | None = Field(default=None, max_length=2_000)


class BatchedReport(_Report):
    action: str = Field(max_length=64)
    payload: dict[str, Any]
    proof: str = Field(max_length=4_096)


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
                        reports: Sequence[tuple[str, dict[str, Any]]]) -> bool:
        """Record already authorized reports, in order, in one transaction: all of them
        or none. True if they ended the build.

        A payload that does not parse, or a step or status change that cannot
        happen, is refused as ``malformed``.
        """
        def unit(w: Writes) -> BuildStatus | None:
            ended: BuildStatus | None = None
            for action, payload in reports:
                try:
                    ended = self._one(w, build_id, hostname, action, payload) or ended
                except ValidationError as e:
                    raise Rejected(Reason.MALFORMED, f"{action} payload: {_where(e)}") from None
            return ended

        try:
            ended = await self.store.write(unit)
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
            lines = [line[:MAX_LOG_LINE_CHARS] for line in logs.lines]
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
