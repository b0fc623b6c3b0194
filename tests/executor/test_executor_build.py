"""Build behaviour, on the bubblewrap sandbox and on the bare runtime."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vela.domain import BuildStatus, StepStatus
from vela.executor import Reason, run_build
from vela.executor.build import _remove_tree
from vela.pipeline import compile_pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def steps(*specs: str) -> str:
    return 'version: "1"\nsteps:\n' + "".join(specs)


def statuses(result):
    return [(s.status, s.reason) for s in result.steps]


async def test_pass(build, runtime):
    result, rec = await build(
        steps(
            "  - name: one\n    commands: [echo hi > f.txt, echo one]\n",
            "  - name: two\n    commands:\n      - cat f.txt\n"
            '      - echo "$VELA_STEP_NAME $VELA_BUILD_ID $VELA_BUILD_NUMBER $VELA_REPO'
            ' $VELA_STEP_NUMBER"\n'
            "      - pwd\n",
        ),
        runtime=runtime,
    )
    assert result.status == BuildStatus.SUCCESS and result.reason is None
    assert [(s.status, s.exit_code) for s in result.steps] == [
        (StepStatus.SUCCESS, 0), (StepStatus.SUCCESS, 0)
    ]
    assert rec.lines[1] == ["one"]
    workspace = "/vela/workspace" if runtime.sandboxed else None
    assert rec.lines[2][:2] == ["hi", "two b-42 7 octo/hello 2"]
    if workspace:
        assert rec.lines[2][2] == workspace
    assert rec.events[0] == ("started", 1, "one")
    assert rec.events[-1] == ("finished", 2, StepStatus.SUCCESS, 0, None)
    for s in result.steps:
        assert s.started_at <= s.finished_at


async def test_fail_skips_the_rest(build, runtime):
    result, rec = await build(
        steps(
            "  - name: one\n    commands: [echo before, exit 3, echo never]\n",
            "  - name: two\n    commands: [echo two]\n",
        ),
        runtime=runtime,
    )
    assert result.status == BuildStatus.FAILURE and result.reason == Reason.STEP_FAILED
    assert result.steps[0].exit_code == 3
    assert statuses(result) == [
        (StepStatus.FAILURE, Reason.NONZERO_EXIT), (StepStatus.SKIPPED, Reason.STEP_FAILED)
    ]
    assert rec.lines[1] == ["before"]  # sh -e stopped at the failure
    assert 2 not in rec.lines
    assert ("finished", 2, StepStatus.SKIPPED, None, Reason.STEP_FAILED) in rec.events
    assert not any(e[:2] == ("started", 2) for e in rec.events)


async def test_ignored_failure_goes_on(build, runtime):
    result, _ = await build(
        steps(
            "  - name: lint\n    failure: ignore\n    commands: ['false']\n",
            "  - name: test\n    commands: ['true']\n",
        ),
        runtime=runtime,
    )
    assert result.status == BuildStatus.SUCCESS
    assert statuses(result) == [
        (StepStatus.FAILURE, Reason.FAILURE_IGNORED), (StepStatus.SUCCESS, None)
    ]
    assert result.steps[0].exit_code == 1


async def test_step_timeout_kills_the_process_group(build, runtime, marker, no_process):
    t0 = time.monotonic()
    result, rec = await build(
        steps(
            f"  - name: slow\n    timeout: 1\n    commands: [sleep {marker} &, echo up,"
            f" sleep {marker}]\n",
            "  - name: after\n    commands: [echo after]\n",
        ),
        runtime=runtime,
    )
    assert time.monotonic() - t0 < 10
    assert result.status == BuildStatus.FAILURE and result.reason == Reason.STEP_TIMEOUT
    assert statuses(result) == [
        (StepStatus.KILLED, Reason.STEP_TIMEOUT), (StepStatus.SKIPPED, Reason.STEP_TIMEOUT)
    ]
    assert result.steps[0].exit_code == 137
    assert rec.lines[1] == ["up"]
    no_process(marker)


async def test_step_timeout_with_failure_ignore_goes_on(build, bwrap_runtime):
    result, _ = await build(
        steps(
            "  - name: slow\n    timeout: 0.5\n    failure: ignore\n    commands: [sleep 30]\n",
            "  - name: after\n    commands: [echo after]\n",
        ),
        runtime=bwrap_runtime,
    )
    assert result.status == BuildStatus.SUCCESS
    assert statuses(result) == [
        (StepStatus.KILLED, Reason.STEP_TIMEOUT), (StepStatus.SUCCESS, None)
    ]


async def test_build_timeout(build, runtime, marker, no_process):
    t0 = time.monotonic()
    result, _ = await build(
        steps(
            "  - name: quick\n    commands: ['true']\n",
            f"  - name: slow\n    timeout: 60\n    commands: [sleep {marker}]\n",
            "  - name: never\n    commands: [echo never]\n",
        ),
        runtime=runtime,
        build_timeout_s=1.0,
    )
    assert time.monotonic() - t0 < 10
    assert result.status == BuildStatus.KILLED and result.reason == Reason.BUILD_TIMEOUT
    assert statuses(result) == [
        (StepStatus.SUCCESS, None),
        (StepStatus.KILLED, Reason.BUILD_TIMEOUT),
        (StepStatus.SKIPPED, Reason.BUILD_TIMEOUT),
    ]
    no_process(marker)


async def test_cancel(build, runtime, recorder, marker, no_process):
    cancel = asyncio.Event()
    rec = recorder(on_line=lambda n, line: line == "ready" and cancel.set())
    t0 = time.monotonic()
    result, _ = await build(
        steps(
            f"  - name: wait\n    commands: [sleep {marker} &, echo ready, sleep {marker}]\n",
            "  - name: never\n    commands: [echo never]\n",
        ),
        runtime=runtime, reporter=rec, cancel=cancel, batch_lines=1,
    )
    assert time.monotonic() - t0 < 10
    assert result.status == BuildStatus.CANCELED and result.reason == Reason.CANCELED
    assert statuses(result) == [
        (StepStatus.CANCELED, Reason.CANCELED), (StepStatus.SKIPPED, Reason.CANCELED)
    ]
    no_process(marker)


async def test_cancel_before_start(build, bwrap_runtime):
    cancel = asyncio.Event()
    cancel.set()
    result, rec = await build(steps("  - name: a\n    commands: [echo a]\n"),
                              runtime=bwrap_runtime, cancel=cancel)
    assert result.status == BuildStatus.CANCELED
    assert statuses(result) == [(StepStatus.SKIPPED, Reason.CANCELED)]
    assert not rec.lines


async def test_task_cancellation_kills_and_cleans(
    runtime, workspace_root, recorder, marker, no_process
):
    ready = asyncio.Event()
    rec = recorder(on_line=lambda n, line: line == "ready" and ready.set())
    task = asyncio.create_task(run_build(
        compile_pipeline(steps(f"  - name: w\n    commands: [echo ready, sleep {marker}]\n")),
        meta={}, secrets={}, runtime=runtime, reporter=rec, workspace_root=workspace_root,
        build_timeout_s=30, batch_lines=1,
    ))
    await asyncio.wait_for(ready.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    no_process(marker)
    # workspace_root fixture asserts the build directory is gone


async def test_background_job_does_not_hold_the_step(build, runtime, marker, no_process):
    t0 = time.monotonic()
    result, rec = await build(
        steps(f"  - name: bg\n    commands: [sleep {marker} &, echo done]\n"),
        runtime=runtime,
    )
    assert time.monotonic() - t0 < 10
    assert result.status == BuildStatus.SUCCESS and rec.lines[1] == ["done"]
    no_process(marker)


async def test_masking_plain_and_base64(build, runtime):
    secret = "tok?>~~en-Value-42"  # its base64 holds '+', so urlsafe differs
    raw = secret.encode()
    forms = {
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        base64.b64encode(b"user:" + raw).decode(),
    }
    result, rec = await build(
        steps(
            "  - name: leak\n    secrets: [api_key]\n    commands:\n"
            '      - echo "plain $API_KEY end"\n'
            '      - printf %s "$API_KEY" | base64\n'
            "      - printf %s \"$API_KEY\" | base64 | tr '+/' '-_'\n"
            "      - printf %s \"$API_KEY\" | base64 | tr -d =\n"
            '      - printf "user:%s" "$API_KEY" | base64\n'
            '      - printf "x%sy%sz\\n" "$API_KEY" "$API_KEY"\n'
            '      - echo "$API_KEY" >&2\n',
            "  - name: unlisted\n    commands: ['echo \"${API_KEY:-unset}\"']\n",
        ),
        runtime=runtime,
        secrets={"api_key": secret},
    )
    assert result.status == BuildStatus.SUCCESS
    text = "\n".join(rec.all_lines())
    assert secret not in text
    for form in forms:
        assert form not in text, form
    assert rec.lines[1][0] == "plain *** end"
    assert rec.lines[1][5] == "x***y***z"
    assert rec.lines[1][6] == "***"  # stderr is captured and masked too
    assert all("***" in line for line in rec.lines[1])
    assert rec.lines[2] == ["unset"]  # a step sees only the secrets it lists


async def test_masking_wrapped_base64_of_a_long_secret(build, bwrap_runtime):
    secret = "ghp_" + "A1b2C3d4E5f6G7h8I9j0" * 3  # 64 bytes: base64 wraps it over two lines
    result, rec = await build(
        steps(
            "  - name: leak\n    secrets: [api_key]\n    commands:\n"
            '      - printf %s "$API_KEY" | base64\n'
            '      - echo "$API_KEY" | base64\n'
            '      - printf %s "$API_KEY" | base64 -w 64\n'
        ),
        runtime=bwrap_runtime,
        secrets={"api_key": secret},
    )
    assert result.status == BuildStatus.SUCCESS
    assert len(rec.lines[1]) == 6
    for line in rec.lines[1]:  # each is *** or, after echo, *** and the newline's bits
        assert "***" in line and len(line.replace("***", "")) <= 3, line


async def test_multiline_secret_masked_per_line(build, bwrap_runtime):
    secret = "-----BEGIN KEY-----\nAAAAsecretbody1\nBBBBsecretbody2\n-----END KEY-----"
    _, rec = await build(
        steps("  - name: k\n    secrets: [deploy_key]\n    commands: ['echo \"$DEPLOY_KEY\"']\n"),
        runtime=bwrap_runtime, secrets={"deploy_key": secret},
    )
    assert rec.lines[1] == ["***"] * 4


async def test_environment_and_no_worker_env(build, runtime, monkeypatch):
    planted = {
        "RAY_ADDRESS": "10.0.0.1:6390",
        "RAY_AUTH_TOKEN": "planted-ray-token",
        "RAY_JOB_ID": "planted-job",
        "VELA_WORKER_REGISTRATION_TOKEN": "planted-registration",
        "AWS_SECRET_ACCESS_KEY": "planted-aws",
        "SOME_WORKER_SETTING": "planted-setting",
    }
    for k, v in planted.items():
        monkeypatch.setenv(k, v)
    result, rec = await build(
        steps(
            "  - name: env\n    environment: {GREETING: hello, PORT: 8080}\n"
            "    secrets: [api_key]\n    commands: [env]\n"
        ),
        runtime=runtime, secrets={"api_key": "the-api-key-value"},
    )
    assert result.status == BuildStatus.SUCCESS
    env = dict(line.split("=", 1) for line in rec.lines[1])
    for k, v in planted.items():
        assert k not in env
        assert v not in "\n".join(rec.lines[1])
    assert not [k for k in env if k.startswith("RAY")]
    assert env["GREETING"] == "hello" and env["PORT"] == "8080"
    assert env["API_KEY"] == "***"
    assert env["VELA_BUILD_ID"] == "b-42" and env["VELA_STEP_NAME"] == "env"
    assert env["PATH"].startswith("/usr/local/sbin:")
    allowed = {
        "PATH", "HOME", "TMPDIR", "LANG", "CI", "VELA", "PWD", "SHLVL", "OLDPWD", "_",
        "GREETING", "PORT", "API_KEY",
    }
    assert {k for k in env if not k.startswith("VELA_")} <= allowed


async def test_missing_secret_is_an_error(build, bwrap_runtime):
    result, rec = await build(
        steps("  - name: a\n    secrets: [nope]\n    commands: [echo a]\n"),
        runtime=bwrap_runtime,
    )
    assert result.status == BuildStatus.ERROR and result.reason == Reason.MISSING_SECRET
    assert "nope" in result.message
    assert statuses(result) == [(StepStatus.SKIPPED, Reason.MISSING_SECRET)]


async def test_batches_bounded_by_size(build, bwrap_runtime):
    _, rec = await build(
        steps("  - name: many\n    commands: ['seq 1 25']\n"),
        runtime=bwrap_runtime, batch_lines=10, flush_s=30,
    )
    assert [len(b) for _, b in rec.batches] == [10, 10, 5]
    assert rec.lines[1] == [str(i) for i in range(1, 26)]


async def test_reporter_errors_do_not_stop_the_build(build, bwrap_runtime, recorder):
    class Broken(recorder):
        async def log(self, number, lines):
            raise RuntimeError("server down")

    result, rec = await build(steps("  - name: a\n    commands: [echo a]\n"),
                              runtime=bwrap_runtime, reporter=Broken())
    assert result.status == BuildStatus.SUCCESS
    assert rec.events[-1] == ("finished", 1, StepStatus.SUCCESS, 0, None)


async def test_start_failure_is_an_error(build, workspace_root):
    from vela.executor import BwrapRuntime

    runtime = BwrapRuntime(bwrap="/bin/true")
    runtime.bwrap = str(workspace_root / "gone")  # vanished after the check
    result, _ = await build(steps("  - name: a\n    commands: [echo a]\n"), runtime=runtime)
    assert result.status == BuildStatus.ERROR and result.reason == Reason.START_FAILED
    assert statuses(result) == [(StepStatus.ERROR, Reason.START_FAILED)]


async def test_example_pipelines(build, bwrap_runtime):
    token = "gr33ting-T0ken-value"
    result, rec = await build(
        (EXAMPLES / "hello.yml").read_text(), runtime=bwrap_runtime,
        secrets={"greeting_token": token},
    )
    assert result.status == BuildStatus.SUCCESS, rec.lines
    text = "\n".join(rec.all_lines())
    assert token not in text and "***" in text

    result, _ = await build((EXAMPLES / "failing.yml").read_text(), runtime=bwrap_runtime)
    assert result.status == BuildStatus.FAILURE and result.reason == Reason.STEP_FAILED
    assert [s.status for s in result.steps] == [
        StepStatus.FAILURE, StepStatus.FAILURE, StepStatus.SKIPPED
    ]
    assert result.steps[0].reason == Reason.FAILURE_IGNORED


async def test_results_serialise(build, bwrap_runtime):
    from vela.executor import BuildResult

    result, _ = await build(steps("  - name: a\n    commands: [echo a]\n"),
                            runtime=bwrap_runtime)
    assert BuildResult.model_validate_json(result.model_dump_json()) == result


async def test_slow_reporter_loses_no_lines(build, bwrap_runtime, recorder, monkeypatch):
    import vela.executor.build as build_module

    monkeypatch.setattr(build_module, "DRAIN_S", 0.05)

    class Slow(recorder):
        async def log(self, number, lines):
            await asyncio.sleep(0.02)  # a slow network, not synchronisation
            await super().log(number, lines)

    result, rec = await build(steps("  - name: a\n    commands: ['seq 1 20']\n"),
                              runtime=bwrap_runtime, reporter=Slow(), batch_lines=1)
    assert result.status == BuildStatus.SUCCESS
    assert rec.lines[1] == [str(i) for i in range(1, 21)]


async def test_unsandboxed_escaped_process_does_not_hang_the_build(
    build, marker, monkeypatch, caplog, processes
):
    import os
    import signal

    import vela.executor.build as build_module
    from vela.executor import LocalRuntime

    monkeypatch.setattr(build_module, "DRAIN_S", 0.2)
    # The step waits (by polling a file) until its child has left the group.
    escape = f"setsid sh -c 'touch escaped; exec sleep {marker}' &"
    t0 = time.monotonic()
    try:
        result, rec = await build(
            steps(
                "  - name: a\n    commands:\n"
                f"      - {escape}\n"
                "      - while [ ! -e escaped ]; do :; done\n"
                "      - echo out\n"
            ),
            runtime=LocalRuntime(),
        )
        assert time.monotonic() - t0 < 5
        assert result.status == BuildStatus.SUCCESS
        assert rec.lines[1] == ["out"]
        assert "outlived the step" in caplog.text
    finally:
        for pid in processes(marker):
            os.kill(pid, signal.SIGKILL)


async def test_read_only_leftovers_are_still_removed(build, runtime):
    result, _ = await build(
        steps("  - name: a\n    commands: ['mkdir -p d/e', 'touch d/e/f', 'chmod 000 d/e',"
              " 'chmod 500 d']\n"),
        runtime=runtime,
    )
    assert result.status == BuildStatus.SUCCESS
    # the build fixture asserts the build directory is gone


NOBODY = 65534


def as_ordinary_user(work: Callable[[], str], within_s: float = 30.0) -> str:
    """``work()`` held to file permissions, as a worker not run by root is: in a forked
    child that becomes nobody when the tests run as root. Its answer, or what it raised."""
    if os.getuid() != 0:
        return work()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # only os calls and modules already imported: no lock another thread holds
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            answer = work()
        except BaseException as e:
            answer = f"raised {type(e).__name__}: {e}"
        try:
            os.write(w, answer.encode())
        finally:
            os._exit(0)
    os.close(w)
    ready: list[int] = []
    try:
        ready, _, _ = select.select([r], [], [], within_s)
        return os.read(r, 1 << 16).decode() if ready else "timed out"
    finally:
        os.close(r)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_leftovers_with_any_permissions_removed_by_a_non_root_worker():
    base = Path(tempfile.mkdtemp(prefix="vela-test-"))
    if os.getuid() == 0:
        os.chown(base, NOBODY, NOBODY)
    build, outside = base / "vela-build-1", base / "outside"

    def leave_and_remove() -> str:
        (outside / "in").mkdir(parents=True)
        outside.chmod(0o500)  # a link's target: must keep its permissions
        for d in ("r/x/y", "w/z", "n/a/b"):
            (build / d).mkdir(parents=True)
        (build / "r/x/f").touch()
        (build / "link").symlink_to(outside)
        for path, mode in (("r/x/f", 0), ("n/a/b", 0), ("n/a", 0), ("r/x", 0o100),
                           ("w", 0o200), ("r", 0o500)):
            (build / path).chmod(mode)
        _remove_tree(build)
        return json.dumps([sorted(os.listdir(base)), stat.S_IMODE(outside.stat().st_mode),
                           (outside / "in").is_dir()])

    try:
        assert as_ordinary_user(leave_and_remove) == json.dumps([["outside"], 0o500, True])
    finally:
        if outside.exists():
            outside.chmod(0o700)
        shutil.rmtree(base)


def test_removal_failure_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    def fail(path, *args, **kwargs):
        raise RecursionError("too deep")

    monkeypatch.setattr(shutil, "rmtree", fail)
    _remove_tree(tmp_path)
    assert "cannot remove build directory" in caplog.text


def test_steps_run_on_uvloop_without_forking_the_worker(build, runtime):
    """Ray runs async actors on uvloop, whose own spawn is a full fork() of the worker
    process (4-5 ms of CPU per step there). A step starts by vfork + exec instead — no
    at-fork handler runs — and its output, exit code and ending work on uvloop too."""
    import os

    import uvloop

    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(1))
    loop = uvloop.new_event_loop()
    try:
        result, rec = loop.run_until_complete(build(
            steps("  - name: one\n    commands: [echo on uvloop, sleep 30 &, exit 3]\n"),
            runtime=runtime))
    finally:
        loop.close()
    assert [(s.status, s.exit_code) for s in result.steps] == [(StepStatus.FAILURE, 3)]
    assert rec.lines[1] == ["on uvloop"]
    assert forks == []
