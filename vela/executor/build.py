"""Run one build's steps in order and report as they go.

Status mapping (reasons are stable codes, see :class:`Reason`):

==========================  ===================  ==========================
what happened               step                 build
==========================  ===================  ==========================
exit code 0                 success              success (if all are)
exit code ≠ 0               failure nonzero_exit failure step_failed
… with ``failure: ignore``  failure              (goes on)
                            failure_ignored
step timeout                killed step_timeout  failure step_timeout
… with ``failure: ignore``  killed step_timeout  (goes on)
build timeout               killed build_timeout killed build_timeout
cancel                      canceled canceled    canceled canceled
process cannot start        error start_failed   error start_failed
a listed secret is missing  (all skipped)        error missing_secret
workspace cannot be made    (all skipped)        error workspace_failed
==========================  ===================  ==========================

Steps after the one that ended the build are ``skipped`` with the build's
reason. Exit codes of processes killed by a signal are reported as
``128 + signal``, the shell convention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from vela.domain import BuildStatus, StepStatus
from vela.executor.logs import LinePump
from vela.executor.masking import Masker
from vela.executor.runtime import DEFAULT_PATH, BuildDirs, Runtime, StepProcess
from vela.pipeline import Executable, Step, shared_secret_key

logger = logging.getLogger("vela.executor")

# After a step's process ends, how long its output pipe may stay idle (and at
# most stay open) before a stray process holding it is given up on.
DRAIN_S = 2.0
MAX_DRAIN_S = 60.0
_META_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Reason(StrEnum):
    NONZERO_EXIT = "nonzero_exit"
    FAILURE_IGNORED = "failure_ignored"
    STEP_FAILED = "step_failed"
    STEP_TIMEOUT = "step_timeout"
    BUILD_TIMEOUT = "build_timeout"
    CANCELED = "canceled"
    START_FAILED = "start_failed"
    MISSING_SECRET = "missing_secret"  # noqa: S105 - a reason code, not a password
    WORKSPACE_FAILED = "workspace_failed"


class Reporter(Protocol):
    """Where the executor sends progress. Lines arrive already masked.

    An exception raised here is logged and does not stop the build; a
    reporter that decides the build must stop sets the cancel event.
    """

    async def step_started(self, number: int, name: str) -> None: ...

    async def step_finished(
        self, number: int, status: StepStatus, exit_code: int | None, reason: str | None
    ) -> None: ...

    async def log(self, number: int, lines: list[str]) -> None: ...


class StepResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    number: int  # 1-based, the order in the executable
    name: str
    status: StepStatus
    exit_code: int | None = None
    reason: Reason | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class BuildResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: BuildStatus
    reason: Reason | None = None
    message: str | None = None  # for people; never holds secret values
    steps: list[StepResult]
    started_at: datetime
    finished_at: datetime


def _now() -> datetime:
    return datetime.now(UTC)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def run_build(
    executable: Executable,
    *,
    meta: Mapping[str, str],
    secrets: Mapping[str, str],
    runtime: Runtime,
    reporter: Reporter,
    workspace_root: Path,
    build_timeout_s: float,
    cancel: asyncio.Event | None = None,
    batch_lines: int = 100,
    flush_s: float = 0.5,
) -> BuildResult:
    """Run ``executable``'s steps in a fresh workspace under ``workspace_root``.

    ``meta`` becomes ``VELA_*`` variables (``{"build_id": "7"}`` →
    ``VELA_BUILD_ID=7``); ``secrets`` maps secret names to values — each step
    sees only those it lists, and every value is masked in all output.
    Setting ``cancel`` stops the build. The workspace is removed before this
    returns, also on error or when the calling task is cancelled.
    """
    run = _BuildRun(
        executable, meta=meta, secrets=secrets, runtime=runtime, reporter=reporter,
        build_timeout_s=build_timeout_s, cancel=cancel or asyncio.Event(),
        batch_lines=batch_lines, flush_s=flush_s,
    )
    return await run.run(workspace_root)


class _BuildRun:
    def __init__(
        self,
        executable: Executable,
        *,
        meta: Mapping[str, str],
        secrets: Mapping[str, str],
        runtime: Runtime,
        reporter: Reporter,
        build_timeout_s: float,
        cancel: asyncio.Event,
        batch_lines: int,
        flush_s: float,
    ) -> None:
        if batch_lines < 1 or flush_s <= 0 or build_timeout_s <= 0:
            raise ValueError("batch_lines, flush_s and build_timeout_s must be positive")
        self.executable = executable
        self.meta = _meta_env(meta)
        self.secrets = dict(secrets)
        self.masker = Masker(self.secrets.values())
        self.runtime = runtime
        self.reporter = reporter
        self.cancel = cancel
        self.batch_lines = batch_lines
        self.flush_s = flush_s
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + build_timeout_s
        self.results: list[StepResult] = []

    async def run(self, workspace_root: Path) -> BuildResult:
        started = _now()
        if not self.runtime.sandboxed:
            # The worker warned once, loudly, when it chose this runtime (choose_runtime),
            # and its status names it; a warning per build only floods the logs.
            logger.info("build %s: steps run WITHOUT a sandbox", self.meta.get("VELA_BUILD_ID"))
        missing = [n for n in self.executable.secret_names() if n not in self.secrets]
        if missing:
            return await self._finish(
                started, BuildStatus.ERROR, Reason.MISSING_SECRET, _missing_message(missing))
        making = asyncio.ensure_future(asyncio.to_thread(_make_dirs, workspace_root))
        try:
            # Shielded: cancelled mid-creation, the thread still finishes, and what it
            # made is removed below rather than leaked.
            dirs = await asyncio.shield(making)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(_remove_tree, (await making).root)
            raise
        except OSError as e:
            return await self._finish(
                started, BuildStatus.ERROR, Reason.WORKSPACE_FAILED,
                f"cannot create a workspace under {workspace_root}: {e.strerror}",
            )
        try:
            status, reason = await self._steps(dirs)
            return await self._finish(started, status, reason)
        finally:
            await asyncio.to_thread(_remove_build_dirs, dirs)

    async def _steps(self, dirs: BuildDirs) -> tuple[BuildStatus, Reason | None]:
        for number, step in enumerate(self.executable.steps, start=1):
            if self.cancel.is_set():
                return BuildStatus.CANCELED, Reason.CANCELED
            if self.loop.time() >= self.deadline:
                return BuildStatus.KILLED, Reason.BUILD_TIMEOUT
            result = await self._step(number, step, dirs)
            self.results.append(result)
            await self._report(self.reporter.step_finished, number, result.status,
                               result.exit_code, result.reason)
            if result.status == StepStatus.SUCCESS or (
                step.ignore_failure
                and result.reason in (Reason.FAILURE_IGNORED, Reason.STEP_TIMEOUT)
            ):
                continue
            return _build_outcome(result)
        return BuildStatus.SUCCESS, None

    async def _step(self, number: int, step: Step, dirs: BuildDirs) -> StepResult:
        started = _now()
        await self._report(self.reporter.step_started, number, step.name)
        try:
            proc = await self.runtime.spawn(step.script(), env=self._env(number, step, dirs),
                                            dirs=dirs)
        except (OSError, ValueError) as e:
            logger.error("step %s: cannot start: %s", step.name, e, exc_info=True)
            return StepResult(number=number, name=step.name, status=StepStatus.ERROR,
                              reason=Reason.START_FAILED, started_at=started,
                              finished_at=_now())

        async def deliver(lines: list[str]) -> None:
            await self._report(self.reporter.log, number, lines)

        assert proc.stdout is not None
        pump = LinePump(proc.stdout, deliver, masker=self.masker,
                        batch_lines=self.batch_lines, flush_s=self.flush_s)
        pumping = asyncio.create_task(pump.run())
        reason: Reason | None = None
        try:
            reason = await self._wait(proc, step)
        finally:
            # Also ends background jobs of a step that exited by itself, and
            # everything when our own task is being cancelled.
            self.runtime.kill(proc)
            returncode = await _reap(proc, pump, pumping, step.name)
        exit_code = _exit_code(returncode)
        if reason is Reason.CANCELED:
            status = StepStatus.CANCELED
        elif reason is not None:
            status = StepStatus.KILLED
        elif returncode == 0:
            status = StepStatus.SUCCESS
        else:
            status = StepStatus.FAILURE
            reason = Reason.FAILURE_IGNORED if step.ignore_failure else Reason.NONZERO_EXIT
        return StepResult(number=number, name=step.name, status=status, exit_code=exit_code,
                          reason=reason, started_at=started, finished_at=_now())

    async def _wait(self, proc: StepProcess, step: Step) -> Reason | None:
        """Wait for the process; on timeout or cancel kill it and say why."""
        remaining = self.deadline - self.loop.time()
        limit, why = remaining, Reason.BUILD_TIMEOUT
        if step.timeout is not None and step.timeout < remaining:
            limit, why = step.timeout, Reason.STEP_TIMEOUT
        exited = asyncio.ensure_future(proc.exited())
        canceled = asyncio.ensure_future(self.cancel.wait())
        try:
            done, _ = await asyncio.wait(
                {exited, canceled}, timeout=max(limit, 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            canceled.cancel()
            if not exited.done():
                exited.cancel()
        if exited in done:
            return None
        return Reason.CANCELED if canceled in done else why

    def _env(self, number: int, step: Step, dirs: BuildDirs) -> dict[str, str]:
        paths = self.runtime.paths(dirs)
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": paths.home,
            "TMPDIR": paths.tmp,
            "LANG": "C.UTF-8",
            "CI": "true",
            "VELA": "true",
        }
        env.update(step.environment)
        env.update({var: self.secrets[ref] for var, ref in step.secret_variables().items()})
        env.update(self.meta)
        env.update({
            "VELA_STEP_NAME": step.name,
            "VELA_STEP_NUMBER": str(number),
            "VELA_STEP_IMAGE": step.image,
            "VELA_WORKSPACE": paths.workspace,
        })
        return env

    async def _report(self, call: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await call(*args)
        except Exception:
            logger.exception("reporter.%s failed; the build goes on",
                             getattr(call, "__name__", call))

    async def _finish(
        self, started: datetime, status: BuildStatus, reason: Reason | None,
        message: str | None = None,
    ) -> BuildResult:
        for number, step in enumerate(self.executable.steps, start=1):
            if number <= len(self.results):
                continue
            self.results.append(StepResult(number=number, name=step.name,
                                           status=StepStatus.SKIPPED, reason=reason))
            await self._report(self.reporter.step_finished, number, StepStatus.SKIPPED,
                               None, reason)
        return BuildResult(status=status, reason=reason, message=message,
                           steps=list(self.results), started_at=started, finished_at=_now())


async def _reap(
    proc: StepProcess, pump: LinePump, pumping: asyncio.Task[None], name: str
) -> int:
    """After the kill: deliver the rest of the output, collect the exit status.

    Normally the pipe ends at once: every process of the step is dead. Only a
    process that left the step's process group (possible unsandboxed) can
    hold it open; give up on the output when the pump has waited DRAIN_S for
    data, or after MAX_DRAIN_S in all. A slow reporter is waited for.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + MAX_DRAIN_S
    while not pump.eof.is_set():
        try:
            await asyncio.wait_for(pump.eof.wait(), DRAIN_S)
        except TimeoutError:
            idle = pump.idle_since
            if (idle is not None and loop.time() - idle >= DRAIN_S) or loop.time() > give_up:
                logger.warning("step %s: a process outlived the step and holds its output; "
                               "the rest of its output is dropped", name)
                pumping.cancel()
                proc.close_output()  # now, not when the stray process dies
                break
    try:
        await pumping  # bounded by the reporter, not by the step
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise  # our own cancellation, not the pump's
    try:
        return await asyncio.wait_for(proc.wait(), DRAIN_S)
    except TimeoutError:
        return proc.returncode if proc.returncode is not None else -9


def _build_outcome(result: StepResult) -> tuple[BuildStatus, Reason]:
    if result.reason == Reason.CANCELED:
        return BuildStatus.CANCELED, Reason.CANCELED
    if result.reason == Reason.BUILD_TIMEOUT:
        return BuildStatus.KILLED, Reason.BUILD_TIMEOUT
    if result.reason == Reason.STEP_TIMEOUT:
        return BuildStatus.FAILURE, Reason.STEP_TIMEOUT
    if result.status == StepStatus.ERROR:
        return BuildStatus.ERROR, result.reason or Reason.START_FAILED
    return BuildStatus.FAILURE, Reason.STEP_FAILED


def _missing_message(missing: list[str]) -> str:
    # The server leaves out a secret the repo may not use as one that does not exist.
    shared = any(shared_secret_key(ref) for ref in missing)
    return f"secrets not provided: {', '.join(missing)}" + (
        " (a shared secret, org/team/name, is given only to repos of its org on its "
        "repo allowlist)" if shared else "")


def _meta_env(meta: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in meta.items():
        if not _META_KEY.fullmatch(key):
            raise ValueError(f"build metadata key {key!r} is not a valid variable name")
        name = key.upper()
        out[name if name.startswith("VELA_") else f"VELA_{name}"] = str(value)
    return out


def _make_dirs(workspace_root: Path) -> BuildDirs:
    workspace_root = workspace_root.absolute()  # bwrap binds need absolute paths
    try:
        root = Path(tempfile.mkdtemp(prefix="vela-build-", dir=workspace_root))
    except FileNotFoundError:  # made by the worker at its start; gone since
        workspace_root.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="vela-build-", dir=workspace_root))
    try:
        return BuildDirs.create(root)
    except OSError:
        _remove_tree(root)
        raise


def _remove_build_dirs(dirs: BuildDirs) -> None:
    """Remove a build's directories: as made, if the steps left them empty (a tenth of
    the system calls of a tree walk: a short build's workspace costs the worker less),
    else, or if anything is in the way, with :func:`_remove_tree`."""
    try:
        dirs.empty.unlink(missing_ok=True)
        for d in (dirs.workspace, dirs.home, dirs.tmp, dirs.root):
            d.rmdir()
    except OSError:
        _remove_tree(dirs.root)


def _remove_tree(root: Path) -> None:
    """Remove a build directory, whatever permissions a step left on what is in it.

    Never raises: the build's result does not depend on it, so what cannot be removed
    is logged and left.
    """
    try:
        try:
            shutil.rmtree(root)
        except OSError:  # most likely a directory that a step made unreadable or read-only
            _open_up_dirs(root)
            shutil.rmtree(root)
    except Exception as e:  # noqa: BLE001 - e.g. RecursionError: leftovers never fail a build
        logger.error("cannot remove build directory %s: %s", root, e)


def _open_up_dirs(root: Path) -> None:
    """Give the owner rwx on ``root`` and every directory under it.

    Symbolic links are neither followed nor changed: what is a directory is asked of
    the entry itself, and no step process is left to swap one for a link in between
    (a sandbox's processes die with its pid namespace when the step ends).
    """
    stack = [str(root)]
    while stack:
        path = stack.pop()
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IRWXU)
            with os.scandir(path) as entries:
                stack += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
