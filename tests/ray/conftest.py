"""One Ray for the whole session: a real ``ray.cluster_utils.Cluster`` (head node,
token authentication on), so tests that lose a node can add and remove worker
nodes. Every test gets its own namespace, data directory and SQLite database."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from vela.config import Settings


def ray_settings(tmp_path, **sections: dict[str, Any]) -> Settings:
    base: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path)},
        "ray": {"namespace": f"vela-test-{uuid.uuid4().hex[:8]}"},
        "scheduler": {"health_check_period_s": 0.2, "health_check_timeout_s": 5.0,
                      "worker_lost_after_s": 5.0},
        "worker": {"checkin_period_s": 1.0, "log_flush_s": 0.05},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return Settings.model_validate(base)


def wait_until(cond: Callable[[], Any], timeout_s: float = 60.0, what: str = "") -> Any:
    """Poll ``cond`` until it returns something truthy; fail on the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.05)


@pytest.fixture
def settings(tmp_path, cluster):
    return ray_settings(tmp_path)


@pytest.fixture
def server(settings):
    """The control plane, torn down after the test."""
    from actors.deploy import start_control_plane, stop_all
    from vela.server.context import bootstrap_database

    asyncio.run(bootstrap_database(settings))
    handles = start_control_plane(settings)
    try:
        yield handles
    finally:
        stop_all(settings.ray.namespace)


def add_worker(settings: Settings, server: dict[str, Any], hostname: str, *,
               routes: tuple[str, ...] = ("vela",), build_limit: int = 1,
               node_id: str | None = None, max_restarts: int = 0) -> Any:
    import ray

    from actors._ray import AUTHORITY
    from actors.deploy import start_worker

    token = ray.get(server[AUTHORITY].registration_token.remote(routes=list(routes),
                                                               hostname=hostname))
    handle, status = start_worker(settings, hostname=hostname, routes=list(routes),
                                  build_limit=build_limit,
                                  state_dir=settings.server.data_dir / "workers" / hostname,
                                  registration_token=token, node_id=node_id,
                                  max_restarts=max_restarts)
    assert status["registered"], status
    return handle


def run_build(server: dict[str, Any], text: str, *, repo: str = "acme/app",
              secrets: dict[str, str] | None = None) -> int:
    import ray

    from actors._ray import SCHEDULER

    for k, v in (secrets or {}).items():
        ray.get(server[SCHEDULER].put_secret.remote(repo, k, v))
    return ray.get(server[SCHEDULER].create_build.remote(repo, text))


def view(server: dict[str, Any], build_id: int) -> dict[str, Any]:
    """The build as the Scheduler shows it; while it restarts, a placeholder."""
    import ray
    from ray.exceptions import ActorUnavailableError

    from actors._ray import SCHEDULER

    try:
        return ray.get(server[SCHEDULER].build_view.remote(build_id), timeout=30)
    except ActorUnavailableError:
        return {"status": "unknown", "started_at": None}


TERMINAL = {"success", "failure", "error", "killed", "canceled"}


def wait_terminal(server: dict[str, Any], build_id: int, timeout_s: float = 90.0
                  ) -> dict[str, Any]:
    return wait_until(lambda: (v := view(server, build_id))["status"] in TERMINAL and v,
                      timeout_s, f"build {build_id} to end")
