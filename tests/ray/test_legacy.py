"""A mixed fleet on the real Ray cluster: route ``vela`` in server mode with a
WorkerActor, route ``gpu`` in legacy mode with a LegacyWorkerActor pulling from the
queue itself; the same pipeline runs on both."""

from __future__ import annotations

import pytest

from tests.ray.conftest import add_worker, ray_settings, wait_terminal
from tests.server.conftest import HELLO

pytestmark = pytest.mark.ray

WORKER_SECRET = "ray-legacy-WORKER-SECRET-0123456789"
SECRET = "ray-mixed-s3cr3t"


@pytest.fixture
def settings(tmp_path, cluster):
    return ray_settings(tmp_path, queue={"routes": ["vela", "gpu"], "legacy_routes": ["gpu"]},
                        server={"worker_secret": WORKER_SECRET},
                        worker={"worker_secret": WORKER_SECRET})


def test_mixed_fleet_on_ray(settings, server):
    import ray

    from actors._ray import LEGACY_GATEWAY, SCHEDULER
    from actors.deploy import start_legacy_worker, vela_actors

    assert LEGACY_GATEWAY in server
    add_worker(settings, server, "queueless", routes=("vela",))
    _, status = start_legacy_worker(settings, hostname="puller", routes=["gpu"],
                                    build_limit=1,
                                    state_dir=settings.server.data_dir / "legacy" / "puller",
                                    worker_secret=WORKER_SECRET, max_restarts=0)
    assert status["registered"] and status["mode"] == "legacy", status
    # A legacy worker that names a server-mode route is refused with the reason.
    _, stray = start_legacy_worker(settings, hostname="stray", routes=["vela"], build_limit=1,
                                   state_dir=settings.server.data_dir / "legacy" / "stray",
                                   worker_secret=WORKER_SECRET, max_restarts=0,
                                   timeout_s=30)
    assert not stray["registered"] and stray["refused"] == "route_mode_mismatch", stray
    assert {"vela-legacy-gateway", "vela-legacy-worker-puller"} <= set(
        vela_actors(settings.ray.namespace))

    sched = server[SCHEDULER]
    ray.get(sched.put_secret.remote("acme/app", "api_token", SECRET))
    ids = {route: ray.get(sched.create_build.remote("acme/app", HELLO, route=route))
           for route in ("vela", "gpu")}
    for route, worker in (("vela", "queueless"), ("gpu", "puller")):
        v = wait_terminal(server, ids[route])
        assert (v["status"], v["worker"]) == ("success", worker), v
        text = "".join(c["text"] for c in v["logs"])
        assert "token is ***" in text and SECRET not in text
    stats = ray.get(server[LEGACY_GATEWAY].stats.remote())
    assert stats["claimed"] == 1 and stats["secret_reads"] == 1
    assert stats["rejected"].get("route_mode_mismatch", 0) >= 1  # the stray, retrying
