"""Whether `vela serve` may reuse the control actors it finds running (vela.launch)."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from vela.config import Settings, absolute_paths
from vela.launch import changed_keys, reuse_refusal, started_with

DB_PASSWORD = "hunter2-Pa55word"
MASTER_KEY = "ab" * 32
SALT = "s" * 32


def settings(**sections) -> Settings:
    return Settings.model_validate({"server": {"data_dir": "/srv/vela"}, **sections})


def running(s: Settings, *names: str) -> dict:
    return {name: started_with(s, SALT) for name in names or ("vela-scheduler",)}


def test_alike_settings_reuse_the_running_control_plane():
    s = settings()
    assert reuse_refusal(running(s, "vela-scheduler", "vela-token-authority"),
                         started_with(settings(), SALT)) is None
    assert reuse_refusal({}, started_with(s, SALT)) is None  # nothing runs


def test_other_settings_are_refused_by_name_never_by_value():
    old = settings(database={"url": f"postgresql+asyncpg://vela:{DB_PASSWORD}@db:5432/vela"},
                   server={"data_dir": "/srv/vela", "master_key": MASTER_KEY})
    new = settings(database={"url": "postgresql+asyncpg://vela:other@db2:5432/vela"},
                   queue={"backend": "redis"})
    reason = reuse_refusal(running(old), started_with(new, SALT))
    assert reason is not None
    assert "database.url" in reason and "queue.backend" in reason
    assert "server.master_key" in reason
    assert "vela stop" in reason and "vela serve" in reason and "\n" not in reason
    for value in (DB_PASSWORD, MASTER_KEY, "db2", "redis://", "/srv/vela"):
        assert value not in reason
    assert "server.data_dir" not in reason and "scheduler." not in reason


def test_what_an_actor_reports_holds_no_value_and_depends_on_the_salt():
    s = settings(database={"url": f"postgresql+asyncpg://vela:{DB_PASSWORD}@db/vela"},
                 server={"data_dir": "/srv/vela", "master_key": MASTER_KEY},
                 queue={"backend": "redis", "redis_url": f"redis://:{DB_PASSWORD}@r:6379/0"})
    reported = str(started_with(s, SALT))
    assert DB_PASSWORD not in reported and MASTER_KEY not in reported
    assert "database.url" in reported and "/srv/vela" not in reported
    assert started_with(s, SALT) != started_with(s, "t" * 32)
    assert started_with(s, SALT) == started_with(s.model_copy(deep=True), SALT)


def test_paths_are_compared_as_load_settings_made_them_absolute(tmp_path):
    """`vela serve` run again from the same directory with the same relative paths is
    the same server; from another directory, its `.vela` is another database."""
    def loaded(base: Path) -> Settings:
        return absolute_paths(Settings.model_validate(
            {"server": {"data_dir": ".vela"},
             "database": {"url": "sqlite+aiosqlite:///.vela/v.db"}}), base)

    assert reuse_refusal(running(loaded(tmp_path)), started_with(loaded(tmp_path), SALT)) \
        is None
    reason = reuse_refusal(running(loaded(tmp_path)),
                           started_with(loaded(tmp_path / "elsewhere"), SALT))
    assert reason is not None and "server.data_dir" in reason and "database.url" in reason
    assert str(tmp_path) not in reason


def test_what_the_running_control_plane_does_not_use_is_not_compared():
    """The local workers' settings (their own start compares them, vela.worker.launch),
    how this process reaches Ray and what the CLI calls change no control actor."""
    new = settings(worker={"build_limit": 4, "registration_token": "vrt_" + "x" * 40},
                   ray={"address": "auto", "head_port": 6400},
                   api={"url": "https://ci.example.com", "credentials_file": "/tmp/c.json"})
    assert reuse_refusal(running(settings()), started_with(new, SALT)) is None
    served = settings(api={"port": 9090}, tokens={"build_token_grace_s": 10},
                      server={"data_dir": "/srv/vela", "worker_secret": "w" * 20})
    reason = reuse_refusal(running(settings()), started_with(served, SALT))
    assert reason is not None
    assert "api.port" in reason and "tokens.build_token_grace_s" in reason
    assert "server.worker_secret" in reason and "w" * 20 not in reason


def test_each_running_actor_is_compared_the_legacy_gateway_too():
    """A gateway left from a legacy-mode server refuses a server-mode start even if
    the other actors run alike."""
    legacy = settings(queue={"mode": "legacy"}, server={"data_dir": "/srv/vela",
                                                         "worker_secret": "w" * 20})
    alike = running(settings(), "vela-scheduler", "vela-token-authority")
    reason = reuse_refusal({**alike, **running(legacy, "vela-legacy-gateway")},
                           started_with(settings(), SALT))
    assert reason is not None and "queue.mode" in reason and "server.worker_secret" in reason


def test_an_actor_that_does_not_answer_or_say_what_it_runs_with_is_refused():
    s = settings()
    silent = reuse_refusal({**running(s), "vela-queue-listener": None}, started_with(s, SALT))
    assert silent is not None and "vela-queue-listener did not answer" in silent
    assert "vela stop" in silent
    older = reuse_refusal({**running(s), "vela-api": {}}, started_with(s, SALT))
    assert older is not None and "another vela version" in older


def test_changed_keys_names_what_differs_on_either_side():
    assert changed_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b", "c"]
    assert changed_keys({"a": 1}, {"a": 1}) == []


def test_a_secret_value_given_as_secretstr_compares_by_value():
    a = settings(database={"url": "sqlite+aiosqlite:////x.db"})
    b = settings()
    b.database.url = SecretStr("sqlite+aiosqlite:////x.db")
    assert reuse_refusal(running(a), started_with(b, SALT)) is None


def test_the_default_database_is_the_same_however_it_is_left_unset(tmp_path):
    """database.url empty (``VELA_DATABASE_URL=`` or ``url = ""``) is the default SQLite
    database, as unset is: a second `vela serve` so configured runs the same server."""
    from vela.config import load_settings

    unset = load_settings(environ={"VELA_SERVER_DATA_DIR": str(tmp_path)})
    empty = load_settings(environ={"VELA_SERVER_DATA_DIR": str(tmp_path),
                                   "VELA_DATABASE_URL": ""})
    named = load_settings(environ={"VELA_SERVER_DATA_DIR": str(tmp_path),
                                   "VELA_DATABASE_URL": unset.database_url()})
    assert unset.database_url() == empty.database_url() == named.database_url()
    for alike in (empty, named):
        assert reuse_refusal(running(unset), started_with(alike, SALT)) is None
    other = load_settings(environ={"VELA_SERVER_DATA_DIR": str(tmp_path / "other")})
    reason = reuse_refusal(running(unset), started_with(other, SALT))
    assert reason is not None and "database.url" in reason and "server.data_dir" in reason
