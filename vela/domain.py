"""Statuses and their allowed transitions, written once; repo names, and the repos a
shared secret's allowlist may name.

The store enforces these with compare-and-set updates, so two concurrent
writers can never both move the same build.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum

from vela.errors import InvalidTransition, VelaError

DEFAULT_ROUTE = "vela"
# The most builds a worker holds beyond its slots (worker.backlog).
MAX_BACKLOG = 64
# An org, repo or team name as the API's paths take them.
OWNER_NAME = r"[A-Za-z0-9_.-]{1,250}"
_REPO_NAME = re.compile(rf"{OWNER_NAME}/{OWNER_NAME}")
MAX_REPO_ALLOWLIST = 100


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


def check_repo_allowlist(scope: str, org: str, repos: Iterable[str]) -> list[str]:
    """A secret's repo allowlist as stored: sorted, each repo once. Only a shared
    secret has one, and it names repos (``org/name``) of the secret's own org."""
    allowed = sorted(set(repos))
    if allowed and scope != "shared":
        raise VelaError("a repo allowlist is for shared secrets only: a repo secret goes to "
                        "its repo's builds, an org secret to those of every repo of its org")
    if len(allowed) > MAX_REPO_ALLOWLIST:
        raise VelaError(f"a repo allowlist names at most {MAX_REPO_ALLOWLIST} repos")
    for repo in allowed:
        if not _REPO_NAME.fullmatch(repo):
            raise VelaError(f"{repo!r} is not a repo's full name, org/name")
        if split_repo(repo)[0] != org:
            raise VelaError(f"{repo}: a shared secret of org {org} is given to repos of org "
                            f"{org} only")
    return allowed
