"""The README's path, as a user runs it: `vela serve --detach`, `vela build run`,
`vela stop`, in subprocesses on the embedded default (own data dir and ports)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vela.cli import app

ROOT = Path(__file__).resolve().parents[2]
VELA = str(Path(sys.executable).parent / "vela")
SECRET = "e2e-Gr33ting"


def vela(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([VELA, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def free_ports(n: int) -> list[str]:
    """Ports nothing listens on now (the kernel's picks), so a run never meets a
    service, or another run, on fixed ones."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [str(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("VELA_", "RAY_"))}
    head, dashboard, api = free_ports(3)
    e.update(VELA_SERVER_DATA_DIR=str(tmp_path / "data"), VELA_RAY_HEAD_PORT=head,
             VELA_RAY_DASHBOARD_PORT=dashboard, VELA_API_PORT=api)
    return e


def test_serve_build_run_stop(env, tmp_path):
    up = vela("serve", "--detach", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "ready" in up.stdout and "worker" in up.stdout
        # What Ray says once connected, not the settings (ray.address may be "auto").
        assert f"Ray dashboard: http://127.0.0.1:{env['VELA_RAY_DASHBOARD_PORT']}" in up.stdout
        assert f":{env['VELA_RAY_HEAD_PORT']})" in up.stdout
        ok = vela("build", "run", "examples/hello.yml", "--repo", "demo/hello",
                  "--secret", f"greeting_token={SECRET}", env=env)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "the greeting token is ***" in ok.stdout
        assert SECRET not in ok.stdout + ok.stderr
        assert "build 1 success" in ok.stdout
        bad = vela("build", "run", "examples/failing.yml", "--repo", "demo/hello", env=env)
        assert bad.returncode == 1 and "failure" in bad.stdout
        # Through the HTTP API, as the admin `vela serve` logged the local CLI in as.
        assert f"API up at http://127.0.0.1:{env['VELA_API_PORT']}" in up.stdout
        assert "admin credential" in up.stdout and "logged in as admin" in up.stdout
        creds = Path(env["VELA_SERVER_DATA_DIR"]) / "credentials.json"
        assert creds.stat().st_mode & 0o777 == 0o600
        api = vela("build", "submit", "examples/hello.yml", "--repo", "demo/hello",
                   "--follow", env=env)
        assert api.returncode == 0, api.stdout + api.stderr
        assert "step 1" in api.stdout and "build 3 success" in api.stdout
        assert SECRET not in api.stdout and "the greeting token is ***" in api.stdout
        bad = vela("build", "submit", "examples/failing.yml", "--repo", "demo/hello",
                   "--follow", env=env)
        assert bad.returncode == 1 and "failure" in bad.stdout
        workers = vela("workers", "--json", env=env)
        assert workers.returncode == 0 and len(json.loads(workers.stdout)) == 2
        status = vela("status", env=env)
        assert status.returncode == 0 and "vela-scheduler" in status.stdout
        again = vela("serve", "--detach", env=env)  # idempotent
        assert again.returncode == 0, again.stderr
        assert "replaced" not in again.stderr  # its registered workers are kept
        # With other settings it refuses, naming them, and leaves the server running.
        other_db = f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
        other = vela("serve", "--detach", env={**env, "VELA_DATABASE_URL": other_db})
        said = " ".join(other.stderr.split())  # as one line, however the terminal wraps
        assert other.returncode == 1, other.stdout + other.stderr
        assert "other settings (database.url)" in said and "`vela stop`" in said
        assert "other.db" not in other.stdout + said
        # Its admin credential is made only for a server that runs (it is shown once).
        with sqlite3.connect(tmp_path / "other.db") as db:
            assert db.execute("SELECT count(*) FROM api_credentials").fetchone() == (0,)
        # A second `vela serve` that cannot reach its database fails alone: the server
        # already running keeps its actors and still runs builds.
        unreachable = {**env, "VELA_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/x"}
        failed = vela("serve", "--detach", env=unreachable)
        assert failed.returncode == 1
        assert "cannot reach the database" in failed.stdout + failed.stderr
        assert "stopped" not in failed.stdout + failed.stderr
        ok = vela("build", "run", "examples/hello.yml", "--repo", "demo/hello", env=env)
        assert ok.returncode == 0 and "build 5 success" in ok.stdout, ok.stdout + ok.stderr
    finally:
        down = vela("stop", env=env)
    assert down.returncode == 0, down.stderr
    assert "stopped the local Ray head" in down.stdout
    assert "vela-api" in down.stdout  # the HTTP API's actor went with the others
    after = vela("build", "run", "examples/hello.yml", "--repo", "demo/hello", env=env,
                 timeout=120)
    assert after.returncode == 1 and "vela serve" in after.stderr


def test_serve_refuses_without_a_sandbox(env, tmp_path):
    empty = str(tmp_path / "empty")
    r = CliRunner().invoke(app, ["serve", "--detach"],
                           env={**env, "VELA_CONFIG": "", "PATH": empty})
    assert r.exit_code == 1
    assert "bubblewrap" in r.output and "allow_unsandboxed" in r.output


def test_serve_with_an_unreachable_database_fails_clearly_and_leaves_nothing(env):
    """The migrations run while Ray's head starts; when they fail, the head that
    `vela serve` started is stopped again and the error says what to fix."""
    env = {**env, "VELA_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/vela"}
    failed = vela("serve", "--detach", env=env)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "cannot reach the database" in out and "VELA_DATABASE_URL" in out
    assert "Traceback" not in out
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", int(env["VELA_RAY_HEAD_PORT"]))) != 0
