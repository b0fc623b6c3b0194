"""A route is served in one queue mode only; every way to break that is refused at
start with a message that says what to change."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.legacy.conftest import WORKER_SECRET
from vela.cli import app
from vela.config import Settings, load_settings
from vela.errors import ConfigError
from vela.legacy.modes import check_server_modes, check_worker_modes
from vela.security import Reason, Registration, Rejected, hash_registration_token


def settings(**sections) -> Settings:
    return Settings.model_validate(sections)


def test_default_is_server_mode_everywhere():
    q = Settings().queue
    assert q.mode == "server" and q.legacy_route_names() == ()
    assert q.server_route_names() == ("vela",)
    check_server_modes(Settings())
    check_worker_modes(Settings(), ["vela"])


def test_route_split():
    mixed = settings(queue={"routes": ["vela", "gpu", "big"], "legacy_routes": ["gpu"]})
    assert mixed.queue.legacy_route_names() == ("gpu",)
    assert mixed.queue.server_route_names() == ("vela", "big")
    legacy = settings(queue={"routes": ["vela", "gpu"], "mode": "legacy"})
    assert legacy.queue.legacy_route_names() == ("vela", "gpu")
    assert legacy.queue.server_route_names() == ()


@pytest.mark.parametrize(("env", "says"), [
    ({"VELA_QUEUE_LEGACY_ROUTES": "gpu"}, "legacy_routes names gpu, not in queue.routes"),
    ({"VELA_QUEUE_MODE": "legacy", "VELA_QUEUE_ROUTES": "vela,gpu",
      "VELA_QUEUE_LEGACY_ROUTES": "gpu"}, 'set mode = "server" and list the legacy routes'),
])
def test_contradictory_route_split_is_a_config_error(env, says):
    with pytest.raises(ConfigError) as e:
        load_settings(environ=env)
    assert says in str(e.value) and "environment VELA_QUEUE_" in str(e.value)


def test_legacy_routes_need_a_real_worker_secret():
    base = {"queue": {"routes": ["vela", "gpu"], "legacy_routes": ["gpu"]}}
    with pytest.raises(ConfigError, match="VELA_SERVER_WORKER_SECRET"):
        check_server_modes(settings(**base))
    with pytest.raises(ConfigError, match="at least 16 characters"):
        check_server_modes(settings(**base, server={"worker_secret": "short"}))
    check_server_modes(settings(**base, server={"worker_secret": WORKER_SECRET}))


def test_local_workers_must_fit_the_split():
    base = {"queue": {"routes": ["vela", "gpu"], "legacy_routes": ["gpu"]},
            "server": {"worker_secret": WORKER_SECRET}}
    with pytest.raises(ConfigError, match="vela served in server mode"):
        check_worker_modes(settings(**base, worker={"mode": "legacy"}), ["vela"])
    with pytest.raises(ConfigError, match="gpu served by legacy workers"):
        check_worker_modes(settings(**base), ["vela", "gpu"])
    check_worker_modes(settings(**base, worker={"mode": "legacy"}), ["gpu"])
    check_worker_modes(settings(**base), ["vela"])
    no_secret = {"queue": {"mode": "legacy"}, "worker": {"mode": "legacy"}}
    with pytest.raises(ConfigError, match="VELA_WORKER_WORKER_SECRET"):
        check_worker_modes(settings(**no_secret), ["vela"])


@pytest.mark.parametrize(("env", "says"), [
    ({"VELA_QUEUE_MODE": "legacy"}, "VELA_SERVER_WORKER_SECRET"),
    ({"VELA_QUEUE_ROUTES": "vela,gpu", "VELA_QUEUE_LEGACY_ROUTES": "gpu",
      "VELA_SERVER_WORKER_SECRET": WORKER_SECRET, "VELA_WORKER_MODE": "legacy"},
     "vela served in server mode"),
    ({"VELA_QUEUE_ROUTES": "vela,gpu", "VELA_QUEUE_LEGACY_ROUTES": "vela",
      "VELA_SERVER_WORKER_SECRET": WORKER_SECRET}, "vela served by legacy workers"),
])
def test_serve_refuses_a_bad_split_before_starting_anything(tmp_path, env, says):
    r = CliRunner().invoke(app, ["serve", "--detach"], env={
        "VELA_SERVER_DATA_DIR": str(tmp_path), "VELA_CONFIG": "", **env})
    assert r.exit_code == 2, r.output
    assert says in r.output and "Traceback" not in r.output
    assert not any(tmp_path.iterdir()), "nothing was started or created"


async def test_queueless_worker_on_a_legacy_route_is_refused(mixed):
    token = await mixed.authority.registration_token(routes=["vela", "gpu"], hostname="w1")
    identity = mixed.identity("w1")

    def reg(*routes: str) -> dict:
        return Registration(hostname="w1", routes=list(routes), build_limit=1,
                            sign_public_key=identity.sign_public_key,
                            seal_public_key=identity.seal_public_key,
                            actor_name="vela-worker-w1").model_dump(mode="json")

    with pytest.raises(Rejected) as e:
        await mixed.scheduler.register(reg("vela", "gpu"), token=token)
    assert e.value.reason is Reason.ROUTE_MODE_MISMATCH
    assert "gpu served by legacy workers" in str(e.value)
    # Refused before the token was spent: the worker can fix its routes and register.
    row = await mixed.store.get_registration_token(hash_registration_token(token))
    assert row is not None and row.used_at is None
    assert await mixed.store.find_worker("w1") is None
    await mixed.add_worker("w2", routes=("vela",))  # the server-mode route is fine


async def test_legacy_worker_on_a_server_route_or_with_a_wrong_secret_is_refused(mixed):
    stray = mixed.add_legacy_worker("stray", routes=("vela", "gpu"))
    with pytest.raises(Rejected) as e:
        await stray.connect()
    assert e.value.reason is Reason.ROUTE_MODE_MISMATCH
    assert "vela served in server mode" in str(e.value)
    thief = mixed.add_legacy_worker("thief", secret="not-the-" + WORKER_SECRET)
    with pytest.raises(Rejected) as e:
        await thief.connect()
    assert e.value.reason is Reason.WORKER_SECRET_INVALID
    assert WORKER_SECRET not in str(e.value)
    assert not stray.connected and not thief.connected
