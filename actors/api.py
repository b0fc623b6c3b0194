"""The HTTP API: one detached actor on the head node (where `vela serve` runs) serving
the FastAPI app (``vela.api.create_app``) with uvicorn in its own process. Every
operation is one call on the Scheduler actor, which answers it with the one
:class:`~vela.api.backend.ServerBackend`; the actor holds no state: a token is
checked here against the TokenAuthority's public keys (fetched through the
Scheduler and cached), everything else is the Scheduler's.

One process, started beside the control actors: Ray Serve (which it was until
2026-12-02) took three started one after another (controller, proxy, replica) and one
more actor call per request (docs/performance.md).

`vela serve` submits it (:func:`begin_api`) and waits for it (:func:`wait_api`);
:func:`deploy_api` does both; `vela stop` removes it with the other actors.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors._ray import API, SCHEDULER, actor_error_cause, get_actor
from actors._started import StartedWith
from vela.api.errors import ApiError, Code
from vela.config import Settings
from vela.errors import VelaError


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


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a port in use is an error that says what
    to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise VelaError(f"the API cannot listen on {host}:{port} ({e.strerror}); set "
                        "api.port (VELA_API_PORT) to a free port or stop what holds it"
                        ) from None
    return sock


class ApiServerActor(StartedWith):
    """uvicorn on a thread of its own, on a socket bound before the constructor returns:
    once Ray reports the actor ready, connections queue on the socket. If the server
    stops by itself the process exits and Ray restarts the actor (``max_restarts=-1``)."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from vela.api.app import create_app
        from vela.api.backend import RemoteBackend

        self._settings = settings
        sock = listen(settings.api.host, settings.api.port)
        app = create_app(RemoteBackend(SchedulerCall(settings.ray.namespace)))  # type: ignore[arg-type] # forwards every op
        # Followed logs hold a request open for a whole build: no limit on those.
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                     access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._run, args=(sock,), name="vela-api",
                                        daemon=True)
        self._thread.start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        finally:
            if not self._server.should_exit:
                os._exit(1)  # uvicorn gave up: let Ray start a fresh actor

    def status(self) -> dict[str, Any]:
        return {"listening": f"{self._settings.api.host}:{self._settings.api.port}",
                "started": bool(self._server.started), "pid": os.getpid()}

    def __repr__(self) -> str:
        return f"VelaApi({self._settings.server.id})"


def deploy_api(settings: Settings, *, timeout_s: float = 120.0) -> str:
    """Start the API on this driver's node (idempotent); returns the URL for clients
    once ``/health`` answers."""
    begin_api(settings)
    return wait_api(settings, timeout_s=timeout_s)


def begin_api(settings: Settings) -> Any:
    """Create (or find) the API actor, pinned to this driver's node (the head, where
    `vela serve` runs and ``api.host`` is), without waiting for it."""
    node = ray.get_runtime_context().get_node_id()
    return ray.remote(ApiServerActor).options(
        name=API, namespace=settings.ray.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_task_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(settings)


def wait_api(settings: Settings, *, timeout_s: float = 120.0) -> str:
    """Wait until the actor is up and ``/health`` answers; returns the URL for clients.
    An actor that could not start (a port in use) is reported at once."""
    deadline = time.monotonic() + timeout_s
    handle = get_actor(API, settings.ray.namespace)
    if handle is None:
        raise VelaError("the API actor is not running; start the server with `vela serve`")
    try:
        listening = ray.get(handle.status.remote(), timeout=timeout_s)["listening"]
    except RayActorError as e:
        raise VelaError(f"the API could not start: {actor_error_cause(e)}") from None
    except GetTimeoutError:
        raise VelaError(f"the API did not start within {timeout_s:.0f}s; its log in the "
                        "Ray dashboard (actor vela-api) says why") from None
    wanted = f"{settings.api.host}:{settings.api.port}"
    if listening != wanted:  # an API started earlier, with other settings
        raise VelaError(f"the API already runs on this cluster at {listening}, not at "
                        f"{wanted}: `vela stop` it first, or set api.host and api.port "
                        "to where it runs")
    url = settings.api.listen_url()
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:  # noqa: S310 - ours
                if r.status == 200:
                    return settings.api.base_url()
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.05)
    raise VelaError(f"the API did not answer at {url} ({last}); its log in the Ray "
                    "dashboard (actor vela-api) says why")

