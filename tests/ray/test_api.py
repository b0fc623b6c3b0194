"""The HTTP API actor, on the shared cluster: log in with the admin credential,
store a secret, run a build through HTTP and follow it to the end."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from tests.ray.conftest import add_worker, wait_until
from tests.server.conftest import HELLO

pytestmark = pytest.mark.ray

SECRET = "serve-S3cret-Value"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin_credential(settings) -> str:
    from vela.api.auth import ensure_admin_credential
    from vela.server.context import ServerContext

    async def go() -> str | None:
        ctx = ServerContext.open(settings)
        try:
            return await ensure_admin_credential(ctx.store)
        finally:
            await ctx.close()

    credential = asyncio.run(go())
    assert credential is not None
    return credential


def test_build_end_to_end_through_the_http_api(settings, server):
    import ray

    from actors._ray import API, get_actor
    from actors.api import deploy_api

    settings.api.port = _free_port()
    credential = _admin_credential(settings)
    add_worker(settings, server, "serve-w1")
    url = deploy_api(settings)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").json() == {"status": "ok"}
            assert http.get("/ready").json()["ready"] is True
            assert http.get("/api/v1/workers").status_code == 401
            r = http.post("/api/v1/login", json={"credential": "vac_nope"})
            assert r.status_code == 401 and r.json()["code"] == "bad_credential"
            login = http.post("/api/v1/login", json={"credential": credential})
            assert login.status_code == 200, login.text
            http.headers["Authorization"] = f"Bearer {login.json()['token']}"

            r = http.post("/api/v1/secrets/native/repo/acme/serve",
                          json={"name": "api_token", "value": SECRET})
            assert r.status_code == 201, r.text
            bad = http.post("/api/v1/repos/acme/serve/builds", json={"pipeline": "steps: 3"})
            assert bad.status_code == 422 and bad.json()["code"] == "invalid_pipeline"
            b = http.post("/api/v1/repos/acme/serve/builds", json={"pipeline": HELLO})
            assert b.status_code == 201, b.text
            with http.stream("GET", f"/api/v1/builds/{b.json()['id']}/logs",
                             params={"follow": "true"}) as r:
                assert r.status_code == 200
                events = [json.loads(line) for line in r.iter_lines() if line]
            assert events[-1] == {"event": "end", "status": "success", "reason": None}
            text = "".join(e["text"] for e in events if e["event"] == "log")
            assert "token is ***" in text and SECRET not in text

            build = http.get(f"/api/v1/repos/acme/serve/builds/{b.json()['number']}").json()
            assert build["status"] == "success" and build["worker"] == "serve-w1"
            workers = http.get("/api/v1/workers").json()
            assert [w["hostname"] for w in workers] == ["serve-w1"] and workers[0]["connected"]
            status = http.get("/api/v1/status").json()
            assert "vela-scheduler" in status["actors"]
            listed = http.get("/api/v1/secrets/native/repo/acme/serve")
            assert SECRET not in listed.text and listed.json()[0]["name"] == "api_token"
        # Every operation runs in the Scheduler: the API's process starts light.

        def server_libraries(_actor: object) -> list[str]:  # by value: runs in the actor
            import sys

            return sorted(m for m in ("sqlalchemy", "alembic", "redis", "aiosqlite",
                                      "asyncpg") if m in sys.modules)

        api = get_actor(API, settings.ray.namespace)
        assert ray.get(api.__ray_call__.remote(server_libraries), timeout=60) == []
    finally:
        ray.kill(get_actor(API, settings.ray.namespace), no_restart=True)


def test_a_port_in_use_is_reported_at_once_with_what_to_do(settings):
    """The API actor binds its port in its constructor: a port someone else holds is a
    clear error from `wait_api` within seconds, not a 120 s wait for /health."""
    import time

    from actors._ray import API, get_actor
    from actors.api import begin_api, wait_api
    from vela.errors import VelaError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        settings.api.port = taken.getsockname()[1]
        begin_api(settings)
        started = time.monotonic()
        with pytest.raises(VelaError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*set "
                                            r"api\.port"):
            wait_api(settings)
    assert time.monotonic() - started < 30
    assert get_actor(API, settings.ray.namespace) is None  # nothing half-started stays


def test_the_api_comes_back_on_its_port_after_its_process_dies(settings, server):
    """A long-lived actor: killed, Ray restarts it and it serves the same port again."""
    import ray
    from ray.exceptions import ActorUnavailableError

    from actors._ray import API, get_actor
    from actors.api import deploy_api

    settings.api.port = _free_port()
    url = deploy_api(settings)
    handle = get_actor(API, settings.ray.namespace)
    try:
        pid = ray.get(handle.status.remote())["pid"]
        ray.kill(handle, no_restart=False)
        assert _wait_answer(url, timeout_s=60) == {"status": "ok"}

        def answered() -> int | None:
            # The handle's first call may still meet the restart (ActorUnavailableError:
            # transient, the call may be asked again) even once the port answers.
            try:
                return ray.get(handle.status.remote(), timeout=30)["pid"]
            except ActorUnavailableError:
                return None

        assert wait_until(answered, 60, "the restarted API's status") != pid
    finally:
        ray.kill(handle, no_restart=True)


def test_an_api_already_running_elsewhere_is_named_not_waited_for(settings):
    """`vela serve` finds the API actor by name: one started with another port is an
    error at once that says where it runs, not a 120 s wait on the new port."""
    import time

    import ray

    from actors._ray import API, get_actor
    from actors.api import begin_api, deploy_api, wait_api
    from vela.errors import VelaError

    settings.api.port = first = _free_port()
    deploy_api(settings)
    try:
        settings.api.port = _free_port()
        begin_api(settings)  # finds the running one
        started = time.monotonic()
        with pytest.raises(VelaError, match=rf"already runs on this cluster at "
                                            rf"127\.0\.0\.1:{first}, not at .*`vela stop`"):
            wait_api(settings)
        assert time.monotonic() - started < 30
    finally:
        ray.kill(get_actor(API, settings.ray.namespace), no_restart=True)


def _wait_answer(url: str, *, timeout_s: float) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(f"{url}/health", timeout=5).json()
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
