"""Whether a new start of a worker keeps the actor already running under its name."""

from __future__ import annotations

from vela.config import Settings
from vela.worker.launch import launch_spec, replace_reason


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
