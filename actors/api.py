"""The HTTP API on Ray Serve: a FastAPI ingress (``vela.api.create_app``) whose every
operation is one call on the Scheduler actor, which answers it with the one
:class:`~vela.api.backend.ServerBackend`. Replicas hold no state: a token is
checked in the replica against the TokenAuthority's public keys (fetched
through the Scheduler and cached), everything else is the Scheduler's.

`vela serve` submits it (:func:`begin_api`) and waits for it (:func:`wait_api`);
:func:`deploy_api` does both; `vela stop` removes it (:func:`stop_api`).
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.schema import ApplicationStatus

from actors._ray import NAMESPACE, SCHEDULER, get_actor
from vela.api.app import create_app
from vela.api.backend import RemoteBackend
from vela.api.errors import ApiError, Code
from vela.config import Settings
from vela.errors import VelaError

APP = "vela-api"


def app_name(namespace: str) -> str:
    """One API per namespace (tests run several namespaces on one cluster)."""
    return APP if namespace == NAMESPACE else f"{APP}-{namespace}"


class SchedulerCall:
    """``call(op, kwargs)`` on the Scheduler actor, its failures as :class:`ApiError`."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._handle: Any | None = None

    def _scheduler(self) -> Any:
        if self._handle is None:
            self._handle = get_actor(SCHEDULER, self.namespace)
            if self._handle is None:
                raise ApiError(503, Code.UNAVAILABLE, "the Scheduler actor is not running; "
                               "start the server with `vela serve`")
        return self._handle

    async def __call__(self, op: str, kwargs: dict[str, Any]) -> Any:
        try:
            result = await self._scheduler().api.remote(op, kwargs)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, ApiError):
                raise cause from None
            raise ApiError(500, Code.INTERNAL, "internal error; the Scheduler's log has "
                           "the details") from None
        except (ActorUnavailableError, RayActorError):
            self._handle = None  # killed for good: look it up again next time
            raise ApiError(503, Code.UNAVAILABLE, "the Scheduler is restarting or down; "
                           "retry in a moment") from None
        if op == "status":
            named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
            result["actors"] = sorted(a["name"] for a in named
                                      if a.get("namespace") == self.namespace)
        return result


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1,
                  # Followed logs hold a request open for a whole build.
                  max_ongoing_requests=1000, health_check_period_s=10)
@serve.ingress()
class ApiIngress:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._backend = RemoteBackend(SchedulerCall(settings.ray.namespace))

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._backend)  # type: ignore[arg-type] # forwards every op

    def __repr__(self) -> str:
        return f"VelaApi({self._settings.server.id})"


def deploy_api(settings: Settings, *, timeout_s: float = 120.0) -> str:
    """Start Serve's proxy on ``api.host:api.port`` (on the head node, where `vela serve`
    runs) and deploy the API (idempotent); returns the URL for clients once ``/health``
    answers on the proxy."""
    begin_api(settings)
    return wait_api(settings, timeout_s=timeout_s)


def begin_api(settings: Settings) -> None:
    """Start Serve and submit the API without waiting for its replica: Serve's chain
    (controller, proxy, replica: a process each) is the longest part of a cold start,
    so `vela serve` starts it first and waits for it last (:func:`wait_api`)."""
    serve.start(proxy_location="HeadOnly",
                http_options={"host": settings.api.host, "port": settings.api.port})
    app = ApiIngress.bind(settings)  # type: ignore[attr-defined] # Serve adds bind
    serve.run_many([serve.RunTarget(app, name=app_name(settings.ray.namespace),
                                    route_prefix="/")], wait_for_applications_running=False)


def wait_api(settings: Settings, *, timeout_s: float = 120.0) -> str:
    """Wait until the proxy answers ``/health`` (which also means the replica is up);
    returns the URL for clients. A deployment that failed is reported at once."""
    _wait_healthy(settings.api.listen_url(), timeout_s,
                  app=app_name(settings.ray.namespace))
    return settings.api.base_url()


def _wait_healthy(url: str, timeout_s: float, *, app: str) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    next_status = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:  # noqa: S310 - ours
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() >= next_status:  # Serve's own view, once a second
            state = serve.status().applications.get(app)
            if state is not None and state.status == ApplicationStatus.DEPLOY_FAILED:
                why = (state.message.strip().splitlines() or ["no message"])[-1]
                raise VelaError(f"the API failed to deploy on Ray Serve ({why}); the "
                                "replica's log in the Ray dashboard has the details")
            next_status = time.monotonic() + 1.0
        time.sleep(0.05)
    raise VelaError(f"the API did not answer at {url} ({last}); if Serve already runs on "
                    "this cluster with other HTTP options, `serve shutdown` it first")


def stop_api(namespace: str) -> bool:
    """Delete our API; shut Serve down too if nothing else runs on it."""
    apps = set(serve.status().applications)
    name = app_name(namespace)
    if name not in apps:
        return False
    serve.delete(name)
    if not apps - {name}:
        serve.shutdown()
    return True
