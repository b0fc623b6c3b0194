"""Statuses and their allowed transitions, written once.

The store enforces these with compare-and-set updates, so two concurrent
writers can never both move the same build.
"""

from __future__ import annotations

from enum import StrEnum

from vela.errors import InvalidTransition, VelaError

DEFAULT_ROUTE = "vela"
# The most builds a worker holds beyond its slots (worker.backlog).
MAX_BACKLOG = 64


class BuildStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"
    KILLED = "killed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_BUILD


TERMINAL_BUILD = frozenset(
    {BuildStatus.SUCCESS, BuildStatus.FAILURE, BuildStatus.ERROR, BuildStatus.KILLED,
     BuildStatus.CANCELED}
)

BUILD_TRANSITIONS: dict[BuildStatus, frozenset[BuildStatus]] = {
    # pending -> error: the queue item was dead-lettered or the build cannot run.
    BuildStatus.PENDING: frozenset({BuildStatus.RUNNING, BuildStatus.CANCELED, BuildStatus.ERROR}),
    # running -> pending: dispatched but never started on a worker (refused or lost).
    BuildStatus.RUNNING: frozenset({BuildStatus.PENDING} | TERMINAL_BUILD),
    **{s: frozenset() for s in TERMINAL_BUILD},
}


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"
    KILLED = "killed"
    CANCELED = "canceled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self not in (StepStatus.PENDING, StepStatus.RUNNING)


STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset(set(StepStatus) - {StepStatus.PENDING}),
    StepStatus.RUNNING: frozenset(
        set(StepStatus) - {StepStatus.PENDING, StepStatus.RUNNING, StepStatus.SKIPPED}
    ),
    **{s: frozenset() for s in StepStatus if s not in (StepStatus.PENDING, StepStatus.RUNNING)},
}


class WorkerStatus(StrEnum):
    IDLE = "idle"            # registered, no builds running
    AVAILABLE = "available"  # running builds, free slots left
    BUSY = "busy"            # every slot taken
    ERROR = "error"          # unreachable or dead

    @staticmethod
    def for_load(running: int, limit: int) -> WorkerStatus:
        if running <= 0:
            return WorkerStatus.IDLE
        return WorkerStatus.BUSY if running >= limit else WorkerStatus.AVAILABLE


WORKER_TRANSITIONS: dict[WorkerStatus, frozenset[WorkerStatus]] = {
    # A worker's load moves freely between the live states; error is left only
    # when the worker proves itself again (re-registration or a health check).
    s: frozenset(set(WorkerStatus) - {s}) for s in WorkerStatus
}


def check_transition(kind: str, table: dict, old: StrEnum, new: StrEnum) -> None:
    if new not in table[old]:
        raise InvalidTransition(f"{kind} cannot move from {old} to {new}")


def check_build_transition(old: BuildStatus, new: BuildStatus) -> None:
    check_transition("build", BUILD_TRANSITIONS, old, new)


def check_step_transition(old: StepStatus, new: StepStatus) -> None:
    check_transition("step", STEP_TRANSITIONS, old, new)


def split_repo(full_name: str) -> tuple[str, str]:
    """``org/name`` into its two parts; anything else is a :class:`VelaError`."""
    org, sep, name = full_name.partition("/")
    if not sep or not org or not name or "/" in name:
        raise VelaError(f"repository must look like 'org/name', got {full_name!r}")
    return org, name
