"""Starting workers the way `vela worker` and `vela serve` do (actors/deploy.py)."""

from __future__ import annotations

import pytest

from tests.ray.conftest import run_build, view
from tests.server.conftest import HELLO
from vela.errors import VelaError

pytestmark = pytest.mark.ray


def test_a_worker_that_failed_to_register_is_replaced_by_the_next_start(settings, server):
    """`vela worker` without a registration token fails; the next one, with a token,
    must start a worker with its own arguments, not get the failed actor back (which
    would fail again, asking for the token it was just given). A registered worker
    started alike is kept; one started with other arguments is replaced."""
    import ray

    from actors._ray import AUTHORITY
    from actors.deploy import start_worker

    def start(token=None, build_limit=1):
        return start_worker(settings, hostname="wf", routes=["vela"], build_limit=build_limit,
                            state_dir=settings.server.data_dir / "wf",
                            registration_token=token, timeout_s=60)

    _, failed = start()
    assert failed["registered"] is False and "no registration token" in failed["error"]
    assert failed.get("replaced") is None

    token = ray.get(server[AUTHORITY].registration_token.remote(routes=["vela"],
                                                               hostname="wf"))
    _, retried = start(token)
    assert retried["registered"] is True, retried
    assert retried["error"] is None and retried["pid"] != failed["pid"]
    assert "not registered" in retried.get("replaced", "")

    _, again = start()  # registered: its key proves it, no token needed
    assert again["registered"] is True and again["replaced"] is None
    assert again["pid"] == retried["pid"]

    _, bigger = start(build_limit=2)
    assert bigger["registered"] is True, bigger  # registers again with its key
    assert bigger["build_limit"] == 2 and bigger["pid"] != retried["pid"]
    assert "build_limit 1, not 2" in bigger["replaced"]


@pytest.mark.parametrize(("build_limit", "state", "cause"), [
    (-3, "ok", "ValueError: build_limit must be at least 1"),
    (1, "a-file/state", "NotADirectoryError"),
])
def test_a_worker_that_cannot_start_is_a_one_line_error(settings, build_limit, state, cause):
    """A constructor that fails (a bad build limit, a state_dir that cannot be made)
    is a VelaError naming the cause, not Ray's ActorDiedError and its traceback."""
    from actors.deploy import start_worker, stop_all

    (settings.server.data_dir / "a-file").write_text("not a directory")
    try:
        with pytest.raises(VelaError) as e:
            start_worker(settings, hostname="wbad", routes=["vela"], build_limit=build_limit,
                         state_dir=settings.server.data_dir / state, max_restarts=0,
                         timeout_s=30)
        assert str(e.value).startswith("worker wbad could not start: ")
        assert cause in str(e.value) and "\n" not in str(e.value)
    finally:
        stop_all(settings.ray.namespace)


def test_a_listener_that_cannot_start_says_why_in_its_status(settings):
    """It keeps trying (the Scheduler may come later); its status said only "starting"."""
    import ray

    from actors._ray import LISTENER
    from actors.deploy import _options, stop_all
    from actors.queue_listener import QueueListenerActor
    from tests.ray.conftest import wait_until

    listener = QueueListenerActor.options(**_options(LISTENER, settings.ray.namespace)).remote(
        settings)  # no Scheduler in this namespace
    try:
        status = wait_until(lambda: (s := ray.get(listener.status.remote(), timeout=30))
                            ["last_error"] != "starting" and s, timeout_s=60,
                            what="the listener to say why it cannot start")
        assert status["healthy"] is False
        assert status["last_error"] == ("cannot start yet: RuntimeError: the Scheduler actor "
                                        "is not running yet")
    finally:
        stop_all(settings.ray.namespace)


def test_a_second_start_reuses_a_server_started_alike_and_refuses_one_started_otherwise(
        settings, server):
    """`vela serve` finds the control actors of a server already running. With the same
    settings it gets them back; with another database it refuses, naming the settings
    (never their values), and the running actors keep serving their own database."""
    import os

    import ray
    from pydantic import SecretStr

    from actors.deploy import start_control_plane

    password = "Pa55-not-shown"

    def pids(handles):
        return {name: ray.get(h.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
                for name, h in handles.items()}

    before = pids(server)
    again = start_control_plane(settings.model_copy(deep=True))
    assert pids(again) == before

    other = settings.model_copy(deep=True)
    other.database.url = SecretStr(f"postgresql+asyncpg://vela:{password}@127.0.0.1:1/other")
    other.scheduler.dispatch_batch = 3
    with pytest.raises(VelaError) as refused:
        start_control_plane(other)
    reason = str(refused.value)
    assert "database.url" in reason and "scheduler.dispatch_batch" in reason
    assert "`vela stop`" in reason and "\n" not in reason
    assert password not in reason and "127.0.0.1:1" not in reason
    assert pids(server) == before
    build = run_build(server, HELLO)  # in its own database, which the new one is not
    assert view(server, build)["status"] == "pending"
