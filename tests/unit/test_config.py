"""Configuration: sources in order, clear errors, secrets never shown."""

from __future__ import annotations

import logging

import pytest

from vela.config import REDACTED, load_settings, redacted
from vela.errors import ConfigError


def test_defaults_are_the_embedded_system(tmp_path):
    s = load_settings(environ={"VELA_SERVER_DATA_DIR": str(tmp_path)})
    assert s.queue.backend == "database" and s.queue.mode == "server"
    assert s.database_url() == f"sqlite+aiosqlite:///{tmp_path / 'vela.db'}"
    assert s.ray.address == "" and s.ray.head_port != 6379
    assert s.worker.mode == "queueless" and s.queue.routes == ["vela"]


def test_file_then_env_override(tmp_path):
    cfg = tmp_path / "vela.toml"
    cfg.write_text('[queue]\nbackend = "redis"\nroutes = ["a", "b"]\nlease_seconds = 5\n')
    s = load_settings(cfg, environ={"VELA_QUEUE_ROUTES": "c, d", "VELA_QUEUE_LEASE_SECONDS": "7"})
    assert s.queue.backend == "redis"
    assert s.queue.routes == ["c", "d"] and s.queue.lease_seconds == 7
    assert load_settings(environ={"VELA_CONFIG": str(cfg)}).queue.routes == ["a", "b"]


@pytest.mark.parametrize(("body", "expected"), [
    ("[queue]\nbogus = 1\n", "queue.bogus: unknown key"),
    ("[nope]\nx = 1\n", "nope: unknown key"),
    ('[queue]\nbackend = "kafka"\n', "queue.backend"),
    ("[worker]\nbuild_limit = 0\n", "worker.build_limit"),
    ("[queue\n", "not valid TOML"),
])
def test_bad_file_names_key_and_file(tmp_path, body, expected):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, environ={})
    assert str(cfg) in str(e.value) and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_env_names_variable():
    with pytest.raises(ConfigError, match="VELA_SCHEDULER_HEALTH_CHECK_PERIOD_S"):
        load_settings(environ={"VELA_SCHEDULER_HEALTH_CHECK_PERIOD_S": "soon"})


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent/vela.toml", environ={})


def test_unreadable_file_is_a_config_error(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[server]\nid = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text .*: save it as UTF-8"):
        load_settings(latin1, environ={})
    with pytest.raises(ConfigError, match="is a directory: give the path of a TOML file"):
        load_settings(tmp_path, environ={})


def test_secrets_hidden_in_repr_logs_and_show(caplog):
    env = {"VELA_SERVER_MASTER_KEY": "ab" * 32,
           "VELA_DATABASE_URL": "postgresql+asyncpg://vela:hunter2pw@db/vela",
           "VELA_WORKER_REGISTRATION_TOKEN": "vrt_supersecret"}
    s = load_settings(environ=env)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("settings: %s %r", s, s)
    shown = str(redacted(s))
    for secret in ("ab" * 32, "hunter2pw", "vrt_supersecret"):
        assert secret not in repr(s) and secret not in caplog.text and secret not in shown
    assert redacted(s)["worker"]["registration_token"] == REDACTED
    assert redacted(s)["database"]["url"] == "postgresql+asyncpg://vela:***@db/vela"
    assert s.master_key() == bytes.fromhex("ab" * 32)


@pytest.mark.parametrize(("url", "shown"), [
    # A password in the query (asyncpg and redis-py take it there too) and one holding
    # an unencoded "@" (redis-py splits at the last one) were shown in clear.
    ("postgresql+asyncpg://vela@db/vela?password=hunter2pw", "postgresql+asyncpg://vela@db/vela?***"),
    ("redis://cache:6379/0?password=hunter2pw", "redis://cache:6379/0?***"),
    ("redis://default:ab@hunter2pw@cache:6379/0", "redis://default:***@cache:6379/0"),
    ("redis://:hunter2pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ("redis://cache:notaport/0?password=hunter2pw", "redis://cache:notaport/0?***"),
    # Drivers read the password up to its "@": a URL parser took part of it for the port
    # and the path, or stopped at "#".
    ("postgresql+asyncpg://vela:2024/hunter2pw@db:5432/vela", "postgresql+asyncpg://vela:***@db:5432/vela"),
    ("postgresql://vela:8841#hunter2pw@db/vela", "postgresql://vela:***@db/vela"),
    ("redis://cache/0?password=hunter2@pw", REDACTED),  # an "@" in the query
    ("postgresql+asyncpg://vela@db/vela?password=hunter2@pw", REDACTED),
    ("redis://cache:6379/0?password=hunter2@pw", REDACTED),  # the port is no password
])
def test_urls_shown_without_any_password(url, shown):
    s = load_settings(environ={"VELA_QUEUE_REDIS_URL": url})
    assert redacted(s)["queue"]["redis_url"] == shown
    assert "hunter2pw" not in repr(s)


def test_master_key_created_once_private(tmp_path):
    s = load_settings(environ={"VELA_SERVER_DATA_DIR": str(tmp_path)})
    key = s.master_key()
    assert len(key) == 32 and s.master_key() == key
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600


def test_bad_master_key():
    with pytest.raises(ConfigError, match="64 hex"):
        load_settings(environ={"VELA_SERVER_MASTER_KEY": "short"}).master_key()


@pytest.mark.parametrize("name", ["vela.toml", "production.toml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / name
    s = load_settings(path, environ={})
    assert s.ray.head_port != 6379
    if name == "production.toml":
        assert s.queue.backend == "redis" and s.ray.address == "auto"
    else:
        assert s.queue.backend == "database" and s.ray.address == ""


def test_relative_paths_are_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    """The actors run in the Ray node's working directory, not the command's: every
    relative path they get must already name the command's file (the database and the
    master key `vela serve` migrated and printed credentials for)."""
    from pathlib import Path

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    cfg = tmp_path / "vela.toml"
    cfg.write_text('[api]\ncredentials_file = "creds/c.json"\n')
    s = load_settings(cfg, environ={"VELA_WORKER_STATE_DIR": "w/state"})
    assert s.server.data_dir == here / ".vela"  # the default, relative
    assert s.worker.state_dir == here / "w" / "state"  # from the environment
    assert s.api.credentials_file == here / "creds" / "c.json"  # from the file
    assert s.database_url() == f"sqlite+aiosqlite:///{here / '.vela' / 'vela.db'}"
    s.master_key()
    monkeypatch.chdir(tmp_path)  # where an actor would run: the same files still
    assert (here / ".vela" / "master.key").is_file()
    assert s.server.data_dir / "master.key" == here / ".vela" / "master.key"
    assert Path(s.credentials_path()).is_absolute()


def test_absolute_paths_are_kept_as_given(tmp_path):
    from vela.config import Settings, absolute_paths

    given = {"server": {"data_dir": "/srv/../srv/vela"},
             "worker": {"state_dir": str(tmp_path / "w")},
             "api": {"credentials_file": "/etc/vela/c.json"},
             "database": {"url": "sqlite+aiosqlite:////var/lib/vela/v.db"}}
    s = absolute_paths(Settings.model_validate(given), tmp_path / "elsewhere")
    assert str(s.server.data_dir) == "/srv/../srv/vela"  # not even normalised
    assert s.worker.state_dir == tmp_path / "w"
    assert str(s.api.credentials_file) == "/etc/vela/c.json"
    assert s.database_url() == "sqlite+aiosqlite:////var/lib/vela/v.db"
    assert absolute_paths(Settings(), tmp_path).api.credentials_file is None


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite+aiosqlite:///rel/v.db", "sqlite+aiosqlite:///{base}/rel/v.db"),
    ("sqlite:///v.db?timeout=5", "sqlite:///{base}/v.db?timeout=5"),
    ("sqlite+aiosqlite:////abs/v.db", "sqlite+aiosqlite:////abs/v.db"),
    ("sqlite+aiosqlite://", "sqlite+aiosqlite://"),
    ("sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///:memory:"),
    ("postgresql+asyncpg://vela:pw@db/vela", "postgresql+asyncpg://vela:pw@db/vela"),
])
def test_a_relative_sqlite_url_is_made_absolute(tmp_path, url, expected):
    from vela.config import Settings, absolute_paths

    s = absolute_paths(Settings.model_validate({"database": {"url": url}}), tmp_path)
    assert s.database_url() == expected.format(base=tmp_path)


def test_a_tilde_in_a_path_setting_is_the_home_directory(tmp_path, monkeypatch):
    """`~/vela` in a file or variable names the user's home, as in a shell; never a
    directory called `~` below where the command runs."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cfg = home / "vela.toml"
    cfg.parent.mkdir()
    cfg.write_text('[server]\ndata_dir = "~/vela"\n[api]\ncredentials_file = "~/c.json"\n')
    s = load_settings("~/vela.toml",
                      environ={"VELA_WORKER_STATE_DIR": "~/vela/worker",
                               "VELA_DATABASE_URL": "sqlite+aiosqlite:///~/db/v.db"})
    assert s.server.data_dir == home / "vela"
    assert s.api.credentials_file == home / "c.json"
    assert s.worker.state_dir == home / "vela" / "worker"
    assert s.database_url() == f"sqlite+aiosqlite:///{home / 'db' / 'v.db'}"
    assert load_settings(environ={"VELA_CONFIG": "~/vela.toml"}).server.data_dir == home / "vela"
    default_db = load_settings(environ={"VELA_SERVER_DATA_DIR": "~/d"}).database_url()
    assert default_db == f"sqlite+aiosqlite:///{home / 'd' / 'vela.db'}"


def test_a_tilde_naming_no_home_is_a_config_error():
    with pytest.raises(ConfigError, match=r"worker\.state_dir: ~no-such-user-vela/w: cannot "
                                          "find the home directory"):
        load_settings(environ={"VELA_WORKER_STATE_DIR": "~no-such-user-vela/w"})
