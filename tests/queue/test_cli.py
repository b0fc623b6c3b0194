"""`vela queue stats | dead-letters | requeue` against a SQLite database."""

from __future__ import annotations

import asyncio
import json

import pytest
import typer
from typer.testing import CliRunner

from tests.queue.conftest import signed
from vela.cli._app import state
from vela.cli.queue_cmd import app as queue_app
from vela.db.engine import create_engine
from vela.db.models import Base
from vela.queue.db_queue import DatabaseQueue

runner = CliRunner()

# Mounted the way `vela` mounts it, with settings reloaded per invocation.
root = typer.Typer()


@root.callback()
def _fresh_settings() -> None:
    state.config_path = None
    state._settings = None


root.add_typer(queue_app, name="queue")


@pytest.fixture
def env(tmp_path):
    return {
        "VELA_CONFIG": "",
        "VELA_SERVER_DATA_DIR": str(tmp_path),
        "VELA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        "VELA_QUEUE_BACKEND": "database",
        "VELA_QUEUE_ROUTES": "vela,gpu",
    }


def on_db(env, action):
    async def go():
        engine = create_engine(env["VELA_DATABASE_URL"])
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            return await action(DatabaseQueue(engine))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def invoke(env, *args):
    return runner.invoke(root, ["queue", *args], env=env)


@pytest.fixture
def filled(env, signer):
    """vela: 2 ready + 1 in flight; gpu: 1 dead letter (bad signature)."""

    async def fill(q):
        for b in (1, 2, 3):
            await q.push("vela", signed(signer, b))
        await q.reserve(["vela"], lease_s=60)
        raw = json.loads(signed(signer, 9, route="gpu"))
        raw["item"]["build_id"] = 10
        dead_id = await q.push("gpu", json.dumps(raw).encode())
        res = await q.reserve(["gpu"], lease_s=60)
        await q.dead_letter(res, "bad_signature", "signature does not match the item")
        return dead_id

    return on_db(env, fill)


def test_stats_json_lists_configured_routes_even_when_empty(env):
    on_db(env, lambda q: q.depth())
    r = invoke(env, "stats", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {
        "backend": "database",
        "routes": {"vela": {"ready": 0, "in_flight": 0, "dead": 0},
                   "gpu": {"ready": 0, "in_flight": 0, "dead": 0}},
    }


def test_stats(env, filled):
    r = invoke(env, "stats", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["routes"] == {
        "vela": {"ready": 2, "in_flight": 1, "dead": 0},
        "gpu": {"ready": 0, "in_flight": 0, "dead": 1},
    }
    r = invoke(env, "stats")
    assert r.exit_code == 0, r.output
    assert "in flight" in r.stdout
    assert any(line.split() == ["│", "vela", "│", "2", "│", "1", "│", "0", "│"]
               for line in r.stdout.splitlines()), r.stdout


def test_dead_letters(env, filled):
    r = invoke(env, "dead-letters", "--json")
    assert r.exit_code == 0, r.output
    [dead] = json.loads(r.stdout)
    assert dead["id"] == filled
    assert (dead["route"], dead["reason"], dead["build_id"]) == ("gpu", "bad_signature", 10)
    assert dead["detail"] == "signature does not match the item"
    assert dead["deliveries"] == 1

    r = invoke(env, "dead-letters")
    assert r.exit_code == 0, r.output
    assert "bad_signature" in r.stdout and "gpu" in r.stdout


def test_dead_letters_empty(env):
    on_db(env, lambda q: q.depth())
    r = invoke(env, "dead-letters")
    assert r.exit_code == 0 and "no dead letters" in r.stdout
    r = invoke(env, "dead-letters", "--json")
    assert json.loads(r.stdout) == []


def test_requeue(env, filled):
    r = invoke(env, "requeue", filled, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["requeued"] == filled and out["id"] != filled
    depth = on_db(env, lambda q: q.depth())
    assert (depth["gpu"].ready, depth["gpu"].dead) == (1, 0)

    r = invoke(env, "requeue", filled)
    assert r.exit_code == 1
    assert f"no dead letter with id '{filled}'" in r.output


def test_requeue_plain_output(env, filled):
    r = invoke(env, "requeue", filled)
    assert r.exit_code == 0, r.output
    assert f"requeued dead letter {filled} as item" in r.stdout


def test_missing_tables_say_what_to_do(env):
    r = invoke(env, "stats")
    assert r.exit_code == 1
    assert "cannot reach the database queue" in r.output
    assert "vela db upgrade" in r.output


def test_unreachable_redis_says_what_to_check(env):
    env = {**env, "VELA_QUEUE_BACKEND": "redis", "VELA_QUEUE_REDIS_URL": "redis://127.0.0.1:1/0"}
    r = invoke(env, "stats")
    assert r.exit_code == 1
    assert "cannot reach the redis queue" in r.output
    assert "VELA_QUEUE_REDIS_URL" in r.output


def test_help_lists_the_commands(env):
    r = invoke(env, "--help")
    assert r.exit_code == 0
    for cmd in ("stats", "dead-letters", "requeue"):
        assert cmd in r.output
