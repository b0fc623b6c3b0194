"""Executor fixtures: real bubblewrap (never skipped), a recording reporter."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from vela.domain import StepStatus
from vela.executor import BuildResult, BwrapRuntime, LocalRuntime, Runtime, run_build
from vela.pipeline import compile_pipeline

META = {"build_id": "b-42", "build_number": "7", "repo": "octo/hello"}


def require_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        pytest.fail(
            "bubblewrap is required for the sandbox tests and they must not be skipped: "
            "apt-get install -y bubblewrap"
        )
    return path


class Recorder:
    """A Reporter that keeps everything; ``on_line`` sees each delivered line."""

    def __init__(self, on_line: Callable[[int, str], None] | None = None) -> None:
        self.events: list[tuple] = []
        self.batches: list[tuple[int, list[str]]] = []
        self.lines: dict[int, list[str]] = defaultdict(list)
        self.on_line = on_line

    async def step_started(self, number: int, name: str) -> None:
        self.events.append(("started", number, name))

    async def step_finished(
        self, number: int, status: StepStatus, exit_code: int | None, reason: str | None
    ) -> None:
        self.events.append(("finished", number, status, exit_code, reason))

    async def log(self, number: int, lines: list[str]) -> None:
        self.batches.append((number, list(lines)))
        self.lines[number].extend(lines)
        if self.on_line is not None:
            for line in lines:
                self.on_line(number, line)

    def all_lines(self) -> list[str]:
        return [line for _, batch in self.batches for line in batch]


@pytest.fixture
def bwrap_runtime() -> BwrapRuntime:
    return BwrapRuntime(bwrap=require_bwrap(), network=False)


@pytest.fixture(params=["bwrap", "local"])
def runtime(request) -> Runtime:
    if request.param == "bwrap":
        return BwrapRuntime(bwrap=require_bwrap(), network=False)
    return LocalRuntime()


@pytest.fixture
def workspace_root(tmp_path: Path):
    root = tmp_path / "builds"
    root.mkdir()
    yield root
    assert list(root.iterdir()) == [], "the build directory was not removed"


@pytest.fixture
def build(workspace_root: Path):
    """``await build(yaml, runtime=..., ...)`` → (BuildResult, Recorder)."""

    async def _build(
        text: str,
        *,
        runtime: Runtime,
        secrets: dict[str, str] | None = None,
        reporter: Recorder | None = None,
        build_timeout_s: float = 20.0,
        cancel: asyncio.Event | None = None,
        batch_lines: int = 100,
        flush_s: float = 0.05,
    ) -> tuple[BuildResult, Recorder]:
        rec = reporter or Recorder()
        result = await run_build(
            compile_pipeline(text),
            meta=META,
            secrets=secrets or {},
            runtime=runtime,
            reporter=rec,
            workspace_root=workspace_root,
            build_timeout_s=build_timeout_s,
            cancel=cancel,
            batch_lines=batch_lines,
            flush_s=flush_s,
        )
        assert os.listdir(workspace_root) == [], "the build directory was not removed"
        return result, rec

    return _build


def processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd:
            pids.append(int(entry))
    return pids


def assert_no_process(marker: str, within_s: float = 5.0) -> None:
    """Poll (with a deadline) until no process's command line holds ``marker``."""
    deadline = time.monotonic() + within_s
    while processes_with(marker):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes still alive: {processes_with(marker)}")
        time.sleep(0.02)


@pytest.fixture
def no_process() -> Callable[..., None]:
    return assert_no_process


@pytest.fixture
def recorder() -> type[Recorder]:
    return Recorder


@pytest.fixture
def marker() -> str:
    """A unique ``sleep`` argument, to find a step's processes on the host."""
    return f"3{os.getpid() % 1000:03d}.{time.monotonic_ns() % 10**6:06d}"


@pytest.fixture
def processes() -> Callable[[str], list[int]]:
    return processes_with
