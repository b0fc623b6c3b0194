"""The front door: help, version, config show, db upgrade/check on both back ends."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import PG_URL, pg_exec
from vela import __version__
from vela.cli import app
from vela.db.migrate import head_revision

runner = CliRunner()


def invoke(args, env):
    return runner.invoke(app, args, env=env)


@pytest.fixture
def env(tmp_path):
    return {"VELA_SERVER_DATA_DIR": str(tmp_path), "VELA_CONFIG": ""}


def test_help_and_version(env):
    r = invoke(["--help"], env)
    assert r.exit_code == 0
    for cmd in ("config", "db"):
        assert cmd in r.output
    r = invoke(["--version"], env)
    assert r.exit_code == 0 and __version__ in r.output


def test_config_show_redacts(env):
    env = {**env, "VELA_SERVER_MASTER_KEY": "cd" * 32,
           "VELA_QUEUE_REDIS_URL": "redis://:t0psecret@cache:6379/0"}
    r = invoke(["config", "show"], env)
    assert r.exit_code == 0, r.output
    assert "cd" * 32 not in r.output and "t0psecret" not in r.output
    assert "[queue]" in r.output and "redis://:***@cache:6379/0" in r.output
    r = invoke(["config", "show", "--json"], env)
    assert r.exit_code == 0 and '"backend": "database"' in r.output


def test_bad_config_is_one_line_exit_2(env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nid = 3\nnope = true\n")
    r = invoke(["--config", str(bad), "config", "show"], env)
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert str(bad) in r.output and "server" in r.output


def test_config_not_utf8_or_a_directory_is_one_line_exit_2(env, tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[server]\nid = 'caf\xe9'\n".encode("latin-1"))
    for path, says in ((latin1, "is not UTF-8 text"), (tmp_path, "is a directory")):
        r = invoke(["--config", str(path), "config", "show"], env)
        assert r.exit_code == 2, r.output
        assert f"configuration: {path} {says}" in r.output


def test_db_upgrade_and_check_sqlite(env):
    r = invoke(["db", "check"], env)
    assert r.exit_code == 1 and "vela db upgrade" in r.output
    r = invoke(["db", "upgrade"], env)
    assert r.exit_code == 0 and head_revision() in r.output
    r = invoke(["db", "upgrade"], env)
    assert r.exit_code == 0 and "already" in r.output
    r = invoke(["db", "check", "--json"], env)
    assert r.exit_code == 0 and '"up_to_date": true' in r.output


@pytest.fixture
def pg_database():
    """A database of its own, so the CLI's public schema is nobody else's."""
    name = f"vela_cli_{os.getpid()}"
    pg_exec(f"DROP DATABASE IF EXISTS {name}")
    pg_exec(f"CREATE DATABASE {name}")
    yield PG_URL.rsplit("/", 1)[0] + "/" + name
    pg_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_db_upgrade_and_check_postgres(env, pg_database):
    env = {**env, "VELA_DATABASE_URL": pg_database}
    r = invoke(["db", "check"], env)
    assert r.exit_code == 1 and "empty" in r.output
    r = invoke(["db", "upgrade"], env)
    assert r.exit_code == 0, r.output
    r = invoke(["db", "check"], env)
    assert r.exit_code == 0 and "postgresql" in r.output and head_revision() in r.output


def test_db_check_unreachable(env):
    r = invoke(["db", "check"], {**env, "VELA_DATABASE_URL":
                                 "postgresql+asyncpg://postgres@127.0.0.1:1/test"})
    assert r.exit_code == 1 and "cannot use the database" in r.output
    assert "Traceback" not in r.output


def test_worker_token_create_stores_only_a_hash(env):
    assert invoke(["db", "upgrade"], env).exit_code == 0
    r = invoke(["worker-token", "create", "--ttl", "15m", "--routes", "vela", "--json"], env)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    token = out["token"]
    assert token.startswith("vrt_") and out["ttl_s"] == 900 and out["routes"] == ["vela"]
    db = (Path(env["VELA_SERVER_DATA_DIR"]) / "vela.db").read_bytes()
    assert token.encode() not in db
    assert hashlib.sha256(token.encode()).hexdigest().encode() in db


def test_admin_credential_reset_replaces_the_old_one(env, monkeypatch):
    import asyncio

    from vela.api.auth import check_credential
    from vela.api.errors import ApiError
    from vela.config import load_settings
    from vela.db.engine import engine_from
    from vela.db.store import Store

    assert invoke(["db", "upgrade"], env).exit_code == 0
    creds = []
    for _ in range(2):
        r = invoke(["admin-credential", "reset", "--json"], env)
        assert r.exit_code == 0, r.output
        creds.append(json.loads(r.stdout)["credential"])
    old, new = creds
    assert old != new and new.startswith("vac_")
    assert new.encode() not in (Path(env["VELA_SERVER_DATA_DIR"]) / "vela.db").read_bytes()

    for key, value in env.items():
        monkeypatch.setenv(key, value)

    async def check() -> None:
        settings = load_settings(None)
        engine = engine_from(settings)
        try:
            store = Store(engine, settings.master_key())
            assert await check_credential(store, new) == ("admin", ["admin"])
            with pytest.raises(ApiError):
                await check_credential(store, old)
        finally:
            await engine.dispose()

    asyncio.run(check())


@pytest.mark.parametrize("database", ["unreachable", "no_schema"])
def test_database_commands_say_what_to_fix(env, database):
    if database == "unreachable":
        env = {**env, "VELA_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/test"}
    for args in (["admin-credential", "reset"], ["worker-token", "create"]):
        r = invoke(args, env)
        assert r.exit_code == 1, r.output
        assert "cannot use the database" in r.output and "vela db upgrade" in r.output
        assert "Traceback" not in r.output


@pytest.mark.parametrize("ttl", ["0", "1y", "-5m", "soon"])
def test_worker_token_bad_ttl_says_what_to_use(env, ttl):
    r = invoke(["worker-token", "create", "--ttl", ttl], env)
    assert r.exit_code == 1
    assert "15m" in r.output and "Traceback" not in r.output


def test_queue_commands_are_mounted(env):
    r = invoke(["queue", "--help"], env)
    assert r.exit_code == 0 and "dead-letters" in r.output


def test_a_fresh_machine_gets_a_ray_auth_token_once(tmp_path, monkeypatch):
    """`vela serve` keeps Ray's token auth on: with no ~/.ray/auth_token it makes one
    (kept private to the user), and never replaces an existing one."""
    from vela.cli.serve_cmd import ensure_ray_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    ensure_ray_auth_token()
    token = tmp_path / ".ray" / "auth_token"
    first = token.read_text()
    assert len(first) >= 32 and token.stat().st_mode & 0o777 == 0o600
    ensure_ray_auth_token()
    assert token.read_text() == first



def test_the_cli_loads_no_server_library_until_a_command_needs_one():
    """Every `vela` command starts by importing the CLI: the database, queue and Ray
    libraries load only inside the commands that use them. `vela serve` checks the
    queue modes and the sandbox, starts Ray's head, and loads them meanwhile."""
    import subprocess
    import sys

    code = ("import sys, vela.cli, vela.legacy.modes, vela.executor; print(sorted(m for m "
            "in ('sqlalchemy', 'alembic', 'redis', 'ray', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_workers_table_shows_held_builds_apart_from_slots(env, monkeypatch):
    """A worker running 2 builds in 2 slots and holding 1 of a backlog of 3 shows 2/2
    slots and 1/3 held, not 3/2; without any backlog there is no held column."""
    from vela.cli import client_cmd

    def row(name, running, limit, backlog):
        return {"hostname": name, "status": "busy", "connected": True, "active": True,
                "routes": ["vela"], "running_builds": list(range(running)),
                "build_limit": limit, "backlog": backlog, "last_checked_in": None}

    class Api:
        rows: list = []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get(self, path):
            assert path == "/api/v1/workers"
            return self.rows

    monkeypatch.setattr(client_cmd, "_client", Api)
    Api.rows = [row("w-held", 3, 2, 3), row("w-plain", 1, 4, 0)]
    r = invoke(["workers"], env)
    assert r.exit_code == 0, r.output
    assert "held" in r.output
    lines = {line.split()[1]: line for line in r.output.splitlines() if "w-" in line}
    assert "2/2" in lines["w-held"] and "1/3" in lines["w-held"] and "3/2" not in r.output
    assert "1/4" in lines["w-plain"] and "0/0" in lines["w-plain"]
    Api.rows = [row("w-plain", 1, 4, 0)]
    r = invoke(["workers"], env)
    assert r.exit_code == 0 and "1/4" in r.output and "held" not in r.output


def test_worker_backlog_flag_reaches_the_worker_and_its_summary(env, monkeypatch):
    """`vela worker --backlog N` starts the WorkerActor with worker.backlog = N and says
    how many slots it has and how many builds it holds beyond them."""
    import actors.deploy
    from vela.cli import serve_cmd

    started = {}

    def start_worker(settings, **kw):
        started.update(kw, backlog=settings.worker.backlog)
        return None, {"registered": True, "routes": kw["routes"],
                      "build_limit": kw["build_limit"], "backlog": settings.worker.backlog,
                      "free_slots": kw["build_limit"] + settings.worker.backlog}

    monkeypatch.setattr(serve_cmd, "_connect", lambda s, **kw: False)
    monkeypatch.setattr(serve_cmd, "_check_sandbox", lambda s: None)
    monkeypatch.setattr(actors.deploy, "start_worker", start_worker)
    r = invoke(["worker", "--build-limit", "2", "--backlog", "3", "--hostname", "h1"], env)
    assert r.exit_code == 0, r.output
    assert started["backlog"] == 3 and started["build_limit"] == 2
    assert "worker h1 registered: routes vela, 2 slot(s), 3 more held" in r.output
    r = invoke(["worker", "--hostname", "h1"], env)  # the configured default: none
    assert r.exit_code == 0 and started["backlog"] == 0
    assert "2 slot(s)" not in r.output and "more held" not in r.output
    r = invoke(["worker", "--backlog", "65"], env)
    assert r.exit_code == 2 and "backlog" in r.output  # out of range: refused, named


@pytest.mark.parametrize("args", [["worker", "--build-limit", "-3"],
                                  ["worker", "--build-limit", "0"],
                                  ["worker", "--backlog", "-2"],
                                  ["serve", "--local-workers", "-5"]])
def test_out_of_range_numbers_are_refused_before_anything_starts(env, monkeypatch, args):
    """Not a Ray traceback from a worker whose constructor failed: the option is named
    and nothing is started."""
    from vela.cli import serve_cmd

    def never(*a, **kw):
        raise AssertionError("nothing may start")

    monkeypatch.setattr(serve_cmd, "_connect", never)
    monkeypatch.setattr(serve_cmd, "_spawn_local_head", never)
    r = invoke(args, env)
    assert r.exit_code == 2, r.output
    assert args[1] in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(("args", "option"), [
    (["build", "run", "{pipeline}", "--repo", "a/b", "--wait", "-5"], "--wait"),
    (["build", "run", "{pipeline}", "--repo", "a/b", "--wait", "0"], "--wait"),
    (["build", "run", "{pipeline}", "--repo", "a/b", "--wait", "nan"], "--wait"),
    (["build", "logs", "7", "--step", "-1"], "--step"),
])
def test_out_of_range_waits_and_steps_are_refused_before_anything_is_asked(
        env, monkeypatch, tmp_path, args, option):
    """Not a build given up on at once, or a request the API refuses: the option is
    named, exit 2, and neither Ray nor the API is called."""
    from vela.cli import client_cmd, serve_cmd

    def never(*a, **kw):
        raise AssertionError("nothing may be asked")

    pipeline = tmp_path / "p.yml"
    pipeline.write_text("steps: []\n")
    monkeypatch.setattr(serve_cmd, "_connect", never)
    monkeypatch.setattr(client_cmd, "_client", never)
    r = invoke([a.format(pipeline=pipeline) for a in args], env)
    assert r.exit_code == 2, r.output
    assert option in r.output and "Traceback" not in r.output


def test_the_dashboard_and_address_printed_are_the_clusters_own(env, monkeypatch):
    """With ray.address = "auto" there is no host in the setting: what `vela serve`
    prints comes from Ray once connected."""
    import types

    import ray

    from vela.cli import serve_cmd
    from vela.config import load_settings

    s = load_settings(environ={**env, "VELA_RAY_ADDRESS": "auto"})
    monkeypatch.setattr(ray, "init", lambda **kw: types.SimpleNamespace(
        dashboard_url="10.0.0.10:8265"))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(
        gcs_address="10.0.0.10:6390"))
    conn = serve_cmd._connect(s)
    assert conn == serve_cmd.Connection(started=False, address="10.0.0.10:6390",
                                        dashboard_url="http://10.0.0.10:8265")
    monkeypatch.setattr(ray, "init", lambda **kw: types.SimpleNamespace(dashboard_url=""))
    assert serve_cmd._connect(s).dashboard_url == ""  # no dashboard: none printed


def test_stop_elsewhere_says_the_ray_head_was_left_running(env, monkeypatch):
    """`vela stop` from another directory than `vela serve` has no head marker: it
    stops the actors but must not claim the head stopped, and says how to stop it."""
    import actors.deploy
    from vela.cli import serve_cmd

    monkeypatch.setattr(serve_cmd, "_connect", lambda s, **kw: None)
    monkeypatch.setattr(serve_cmd, "_head_is_up", lambda s: True)
    monkeypatch.setattr(actors.deploy, "stop_all", lambda ns: ["vela-scheduler"])
    r = invoke(["stop"], env)
    out = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "stopped 1 actor(s): vela-scheduler" in out
    assert "stopped the local Ray head" not in out
    assert "Ray head on port 6390 was left running" in out
    assert "Run `vela stop` where `vela serve` ran" in out
