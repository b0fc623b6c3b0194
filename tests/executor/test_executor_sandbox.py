"""What a step inside the bubblewrap sandbox can and cannot reach. Real bwrap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import uuid
from pathlib import Path

import pytest
import yaml

from vela.domain import BuildStatus
from vela.executor import BwrapRuntime, LocalRuntime, SandboxUnavailable, choose_runtime
from vela.executor.runtime import DEFAULT_HIDDEN_PATHS, DEFAULT_PATH, BuildDirs


def one_step(*commands: str, secrets: list[str] | None = None) -> str:
    step = {"name": "probe", "commands": list(commands), "secrets": secrets or []}
    return yaml.safe_dump({"version": "1", "steps": [step]})


def look(path: Path | str) -> str:
    """A shell line printing ``VISIBLE`` and the content, or ``HIDDEN``."""
    p = f'"{path}"'
    return (
        f"if [ -f {p} -a -s {p} ] || [ -d {p} -a -n \"$(ls -A {p} 2>/dev/null)\" ]; "
        f"then echo VISIBLE; cat {p} 2>/dev/null; ls -A {p} 2>/dev/null; "
        "else echo HIDDEN; fi"
    )


def sandbox(bwrap_runtime: BwrapRuntime, **kw) -> BwrapRuntime:
    return BwrapRuntime(bwrap=bwrap_runtime.bwrap, **kw)


async def test_worker_state_dir_is_invisible(build, bwrap_runtime, tmp_path):
    state = tmp_path / "worker-state"
    state.mkdir()
    key = state / "worker_ed25519.key"
    key.write_text("PRIVATE-KEY-MATERIAL")
    runtime = sandbox(bwrap_runtime, hidden_paths=[state])
    result, rec = await build(one_step(look(key), look(state)), runtime=runtime)
    assert result.status == BuildStatus.SUCCESS
    assert rec.lines[1] == ["HIDDEN", "HIDDEN"]


async def test_ray_session_dir_is_invisible(build, bwrap_runtime):
    ray = Path("/tmp/ray")
    session = ray / f"vela-test-{uuid.uuid4().hex}"
    session.mkdir(parents=True)
    try:
        (session / "session.json").write_text("RAY-SESSION-SECRET")
        result, rec = await build(
            one_step(look(session / "session.json"), look(ray)), runtime=bwrap_runtime
        )
    finally:
        shutil.rmtree(session)  # only what we made: Ray may be using /tmp/ray
        with contextlib.suppress(OSError):
            os.rmdir(ray)  # succeeds only if we created it and it is empty
    assert result.status == BuildStatus.SUCCESS
    assert rec.lines[1] == ["HIDDEN", "HIDDEN"]


async def test_ray_auth_token_is_invisible(build, bwrap_runtime, tmp_path):
    real = Path.home() / ".ray" / "auth_token"
    if real.exists():
        result, rec = await build(one_step(look(real), look(real.parent)),
                                  runtime=bwrap_runtime)
        assert rec.lines[1] == ["HIDDEN", "HIDDEN"]
    # Without Ray's token here, put a fake one where a bind *would* expose it
    # and check the hidden-path mechanism covers it.
    tools = tmp_path / "tools"
    (tools / "dot-ray").mkdir(parents=True)
    (tools / "ok.txt").write_text("tool-visible\n")
    token = tools / "dot-ray" / "auth_token"
    token.write_text("FAKE-RAY-AUTH-TOKEN")
    state = tools / "state"
    state.mkdir()
    (state / "key").write_text("FAKE-WORKER-KEY")
    runtime = sandbox(bwrap_runtime, ro_binds=[tools], hidden_paths=[token, state])
    result, rec = await build(
        one_step(f"cat {tools}/ok.txt", look(token), look(state / "key"), look(state)),
        runtime=runtime,
    )
    assert result.status == BuildStatus.SUCCESS
    assert rec.lines[1] == ["tool-visible", "HIDDEN", "HIDDEN", "HIDDEN"]
    assert token.read_text() == "FAKE-RAY-AUTH-TOKEN"  # untouched on the host


def test_default_hidden_paths_cover_ray():
    assert Path("/tmp/ray") in DEFAULT_HIDDEN_PATHS
    assert Path.home() / ".ray" in DEFAULT_HIDDEN_PATHS


async def test_filesystem_is_read_only_outside_workspace(build, bwrap_runtime, tmp_path):
    result, rec = await build(
        one_step(
            "touch /usr/vela-x 2>/dev/null && echo usr-writable || echo usr-ro",
            "touch /vela-x 2>/dev/null && echo root-writable || echo root-ro",
            "touch /etc/passwd 2>/dev/null && echo etc-writable || echo etc-ro",
            "touch $HOME/h /tmp/t ./w && echo scratch-ok",
            f"{look('/work')}; {look('/root')}; {look('/sys')}; {look(tmp_path)}",
        ),
        runtime=bwrap_runtime,
    )
    assert result.status == BuildStatus.SUCCESS, rec.lines
    assert rec.lines[1] == [
        "usr-ro", "root-ro", "etc-ro", "scratch-ok", "HIDDEN", "HIDDEN", "HIDDEN", "HIDDEN",
    ]


async def test_own_pid_namespace_no_capabilities_no_secret_in_argv(build, bwrap_runtime):
    result, rec = await build(
        one_step(
            "ls /proc | grep -c '^[0-9]'",
            "grep CapEff /proc/self/status",
            "tr '\\0\\n' '  ' < /proc/1/cmdline; echo",
            secrets=["api_key"],
        ),
        runtime=bwrap_runtime,
        secrets={"api_key": "argv-leak-check-value"},
    )
    assert result.status == BuildStatus.SUCCESS
    nprocs, caps, cmdline = rec.lines[1]
    assert int(nprocs) < 10  # only the sandbox's own processes
    assert caps.split() == ["CapEff:", "0000000000000000"]
    assert "bwrap" in cmdline and "***" not in cmdline  # the secret is not on argv


async def test_a_steps_loader_variables_never_reach_the_host(build, bwrap_runtime):
    """bwrap is loaded by the host's dynamic linker: a step's LD_PRELOAD used to run a
    library of the step's making on the host, outside the sandbox. LD_DEBUG shows which
    programs the linker loads with the step's environment: only the sandbox's own."""
    text = yaml.safe_dump({"version": "1", "steps": [{
        "name": "probe", "commands": ["echo \"inside: $LD_DEBUG $GREETING\""],
        "environment": {"LD_DEBUG": "files", "GREETING": "hi there"}}]})
    result, rec = await build(text, runtime=bwrap_runtime)
    assert result.status == BuildStatus.SUCCESS
    output = "\n".join(rec.lines[1])
    assert "inside: files hi there" in output  # the step's environment, whole, inside
    assert "needed by /bin/sh" in output or "file=" in output  # the linker spoke inside
    assert "bwrap" not in output  # ... but never while loading bwrap on the host


async def test_step_keeps_the_worker_uid(build, bwrap_runtime):
    """docs/security.md: the sandbox does not change the user, it maps it to itself."""
    result, rec = await build(one_step("id -u", "cat /proc/self/uid_map"), runtime=bwrap_runtime)
    assert result.status == BuildStatus.SUCCESS
    uid = str(os.getuid())
    assert rec.lines[1][0] == uid and rec.lines[1][1].split() == [uid, uid, "1"]


def group_session_terminal(pid: int) -> tuple[int, int, int]:
    """A process's group, session and controlling terminal (0: none), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[2]), int(fields[3]), int(fields[4])


async def test_kill_reaches_every_sandbox_process_and_none_has_a_terminal(
    bwrap_runtime, tmp_path, marker, processes, no_process
):
    """Every process of a step (bwrap, the sandbox's init, the shell, its child) is
    in the process group that kill() signals, so ending a step never rests on
    --die-with-parent alone; and the step leads a session of its own without a
    controlling terminal, so it cannot push input to the worker's (TIOCSTI)."""
    proc = await bwrap_runtime.spawn(f"echo ready; sleep {marker}",
                                     env={"PATH": DEFAULT_PATH}, dirs=BuildDirs.create(tmp_path))
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
        pids = processes(marker)
        assert len(pids) >= 3  # bwrap, the sandbox's init, sh; sleep once it has exec'd
        for pid in pids:
            assert group_session_terminal(pid) == (proc.pid, proc.pid, 0), pid
        assert os.getsid(0) != proc.pid
    finally:
        bwrap_runtime.kill(proc)
        await proc.wait()
        proc.close_output()
    no_process(marker)


def host_interfaces() -> set[str]:
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines}


def host_listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


CONNECT = (
    "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 6379), 2);"
    " print(\"connected\")' 2>/dev/null || echo refused"
)
IFACES = "echo $(tail -n +3 /proc/net/dev | cut -d: -f1 | sort)"


async def test_network_off_blocks_the_host(build, bwrap_runtime):
    assert shutil.which("python3", path="/usr/bin"), "the sandbox test uses /usr/bin/python3"
    result, rec = await build(one_step(IFACES, CONNECT), runtime=bwrap_runtime)
    assert result.status == BuildStatus.SUCCESS
    assert rec.lines[1] == ["lo", "refused"]


async def test_network_on_shares_the_host_network(build, bwrap_runtime):
    result, rec = await build(one_step(IFACES, CONNECT),
                              runtime=sandbox(bwrap_runtime, network=True))
    assert result.status == BuildStatus.SUCCESS
    assert set(rec.lines[1][0].split()) == host_interfaces()
    assert rec.lines[1][1] == ("connected" if host_listens(6379) else "refused")


def test_choose_runtime_uses_bwrap_here(bwrap_runtime):
    runtime = choose_runtime(allow_unsandboxed=False, network=False, bwrap=bwrap_runtime.bwrap)
    assert isinstance(runtime, BwrapRuntime) and runtime.sandboxed and not runtime.network


def test_missing_bwrap_refuses_with_a_clear_message(tmp_path):
    with pytest.raises(SandboxUnavailable) as e:
        choose_runtime(allow_unsandboxed=False, network=False, bwrap=str(tmp_path / "bwrap"))
    msg = str(e.value)
    assert "apt-get install -y bubblewrap" in msg
    assert "worker.allow_unsandboxed = true" in msg


def test_broken_bwrap_refuses(tmp_path):
    with pytest.raises(SandboxUnavailable, match="cannot create a sandbox"):
        choose_runtime(allow_unsandboxed=False, network=False, bwrap="/bin/false")


def test_unsandboxed_only_when_allowed_and_loudly(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="vela.executor"):
        runtime = choose_runtime(
            allow_unsandboxed=True, network=False, bwrap=str(tmp_path / "bwrap")
        )
    assert isinstance(runtime, LocalRuntime) and not runtime.sandboxed
    assert "WITHOUT A SANDBOX" in caplog.text
    assert "cannot be enforced" in caplog.text  # network off is not possible bare
