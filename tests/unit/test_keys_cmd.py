"""`vela keys rotate | list` on the database directly (SQLite; the rule itself runs on
both databases in tests/security/test_rotation.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vela.cli import app

runner = CliRunner()


@pytest.fixture
def env(tmp_path):
    env = {"VELA_SERVER_DATA_DIR": str(tmp_path), "VELA_CONFIG": "",
           "VELA_TOKENS_KEY_RELOAD_S": "30"}
    assert runner.invoke(app, ["db", "upgrade"], env=env).exit_code == 0
    return env


def keys(env) -> list[dict]:
    r = runner.invoke(app, ["keys", "list", "--json"], env=env)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_rotate_then_list_shows_public_facts_only(env):
    r = runner.invoke(app, ["keys", "rotate", "token", "--json"], env=env)
    assert r.exit_code == 0, r.output
    [rotation] = json.loads(r.stdout)
    assert rotation["purpose"] == "token" and len(rotation["retired"]) == 1

    listed = keys(env)
    assert {k["purpose"] for k in listed} == {"token"}  # no queue key made: not asked
    by_kid = {k["kid"]: k for k in listed}
    old, new = by_kid[rotation["retired"][0]], by_kid[rotation["kid"]]
    # The old key signs until the switch, two reload periods away; the new one verifies.
    assert old["active"] and old["retired_at"] == rotation["switch_at"]
    assert old["verify_until"] == rotation["verify_until"]
    assert not new["active"] and new["verifies"] and new["created_at"] == rotation["switch_at"]
    assert set(new) == {"kid", "purpose", "created_at", "retired_at", "verify_until",
                        "active", "verifies"}

    r = runner.invoke(app, ["keys", "list"], env=env)
    assert r.exit_code == 0 and rotation["kid"][:10] in r.output and "yes" in r.output

    # Not twice before the switch; and the queue key can rotate meanwhile.
    r = runner.invoke(app, ["keys", "rotate", "token"], env=env)
    assert r.exit_code == 1 and "being rotated" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["keys", "rotate", "queue"], env=env)
    assert r.exit_code == 0 and "queue: new key" in r.output
    assert len(keys(env)) == 4


@pytest.mark.parametrize("zero", ["0", "0s", "0m", " 0h "])
def test_rotate_all_and_cut_short(env, zero):
    r = runner.invoke(app, ["keys", "rotate", "--verify-for", zero, "--json"], env=env)
    assert r.exit_code == 0, r.output
    rotations = json.loads(r.stdout)
    assert [x["purpose"] for x in rotations] == ["token", "queue"]
    assert all(x["verify_until"] == x["switch_at"] for x in rotations)


@pytest.mark.parametrize(("args", "says"), [
    (["keys", "rotate", "nope"], "token, queue or all"),
    (["keys", "rotate", "--verify-for", "soon"], "invalid duration"),
    (["keys", "rotate", "--verify-for", "-1h"], "0 or more"),
    (["keys", "rotate", "--verify-for", "99999999999d"], "at most 100 years"),
])
def test_bad_arguments_say_what_to_use(env, args, says):
    r = runner.invoke(app, args, env=env)
    assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output


def test_without_a_database_it_says_what_to_fix(tmp_path):
    env = {"VELA_SERVER_DATA_DIR": str(tmp_path), "VELA_CONFIG": ""}
    for args in (["keys", "list"], ["keys", "rotate"]):
        r = runner.invoke(app, args, env=env)
        assert r.exit_code == 1 and "vela db upgrade" in r.output, r.output
