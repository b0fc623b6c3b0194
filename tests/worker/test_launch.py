"""Whether a new start of a worker keeps the actor already running under its name."""

from __future__ import annotations

import pytest

from vela.config import Settings
from vela.worker.launch import launch_spec, replace_reason, worker_settings


def spec(settings: Settings | None = None, **kw):
    args = {"hostname": "h1", "routes": ["vela"], "build_limit": 2, "state_dir": "/s/h1", **kw}
    return launch_spec(settings or Settings(), **args)


def registered(started_with):
    return {"registered": True, "error": None, "spec": started_with}


def test_a_registered_worker_started_alike_is_kept():
    assert replace_reason(registered(spec()), spec()) is None


def test_the_registration_token_and_worker_secret_make_no_other_worker():
    """`vela worker` without the token once registered is the same worker; the spec
    (which travels in the actor's status) carries neither secret."""
    with_secrets = Settings.model_validate({"worker": {"registration_token": "vrt_x" * 9,
                                                       "worker_secret": "s" * 20}})
    assert replace_reason(registered(spec(with_secrets)), spec()) is None
    assert "vrt_x" not in str(spec(with_secrets)) and "s" * 20 not in str(spec(with_secrets))


def test_a_worker_whose_registration_failed_is_replaced():
    """The actor that failed for want of a token keeps failing with its old arguments:
    the next start, with a token, must not get it back."""
    failed = {"registered": False, "spec": spec(),
              "error": "no registration token: set VELA_WORKER_REGISTRATION_TOKEN"}
    reason = replace_reason(failed, spec())
    assert reason is not None
    assert "not registered" in reason and "no registration token" in reason
    assert "not registered" in replace_reason({"registered": False, "spec": spec()}, spec())


def test_a_worker_running_builds_while_it_registers_again_is_kept():
    """After a Scheduler restart a worker is unregistered a moment, its builds running:
    a `vela worker` then must not end them. Started otherwise, it is replaced all the
    same."""
    again = {"registered": False, "spec": spec(), "running": [7], "error": "TimeoutError"}
    assert replace_reason(again, spec()) is None
    assert replace_reason(again, spec(build_limit=4)) is not None


def test_other_arguments_or_settings_replace_it_and_say_which():
    reason = replace_reason(registered(spec()), spec(build_limit=4, routes=["gpu"]))
    assert reason is not None
    assert "build_limit 2, not 4" in reason and "routes ['vela'], not ['gpu']" in reason
    backlog = Settings.model_validate({"worker": {"backlog": 3}})
    assert "backlog 0, not 3" in replace_reason(registered(spec()), spec(backlog))


def test_a_worker_that_does_not_answer_or_says_nothing_of_its_start_is_replaced():
    assert replace_reason(None, spec()) == "it did not answer"
    assert "another vela version" in replace_reason({"registered": True}, spec())


SECRETS = ("master-key-value-0123456789abcdef0123", "db-pass-xyz", "redis-pass-xyz",
           "legacy-worker-secret-xyz", "registration-token-xyz")


def settings_with_secrets() -> Settings:
    master, db, redis, legacy, token = SECRETS
    return Settings.model_validate({
        "server": {"master_key": master, "worker_secret": legacy},
        "database": {"url": f"postgresql+asyncpg://vela:{db}@db/vela"},
        "queue": {"redis_url": f"redis://:{redis}@redis:6379/0"},
        "worker": {"registration_token": token, "worker_secret": legacy, "build_limit": 3}})


def test_a_server_mode_worker_is_given_no_server_secret():
    """A WorkerActor never holds a credential that reads secrets: not the master key,
    the worker secret, the database's or the queue's password (nor, in its settings,
    the registration token its constructor gets alone). Pickled as Ray sends them."""
    import pickle

    given = worker_settings(settings_with_secrets())
    sent = pickle.dumps(given)
    for secret in SECRETS:
        assert secret.encode() not in sent, secret
    assert given.worker.build_limit == 3
    assert spec(given) == spec(settings_with_secrets())  # the same worker, as started


@pytest.mark.parametrize("backend", ["database", "redis"])
def test_a_legacy_worker_keeps_the_queue_it_pops_but_no_key_or_secret(backend):
    """Only the URL of the queue it pops: the database's on the database back end, the
    Redis one on Redis; never the other (the database's password reads every
    ciphertext, and a Redis password is no business of a worker on the database)."""
    import pickle

    from vela.queue import open_queue

    full = settings_with_secrets()
    full.queue.backend = backend
    given = worker_settings(full, legacy=True)
    sent = pickle.dumps(given)
    master, db, redis, legacy, token = SECRETS
    kept, stripped = (db, redis) if backend == "database" else (redis, db)
    for secret in (master, legacy, token, stripped):
        assert secret.encode() not in sent, secret
    assert kept.encode() in sent
    queue = open_queue(given)  # opens no connection yet
    assert type(queue).__name__ == ("DatabaseQueue" if backend == "database" else "RedisQueue")
    assert spec(given) == spec(full)


def test_both_worker_starts_send_their_actor_the_stripped_settings(monkeypatch, tmp_path):
    """What actors/deploy.py hands to Ray for a worker actor is worker_settings'."""
    import pickle

    from actors import deploy

    sent = []
    monkeypatch.setattr(deploy, "_start_worker_actor",
                        lambda cls, name, wait, what, settings, **kw: sent.append(settings))
    full = settings_with_secrets()
    deploy.start_worker(full, hostname="h1", routes=["vela"], build_limit=1,
                        state_dir=tmp_path, registration_token="x")
    deploy.start_legacy_worker(full, hostname="h1", routes=["vela"], build_limit=1,
                               state_dir=tmp_path, worker_secret="y")
    assert len(sent) == 2
    master, _, _, legacy, _ = SECRETS
    for given in sent:
        assert master.encode() not in pickle.dumps(given)
        assert legacy.encode() not in pickle.dumps(given)
