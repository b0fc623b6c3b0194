"""Create, find and tear down the actors: what `vela serve`, `vela worker` and
`vela stop` do once connected to Ray. Creation is idempotent (named, detached,
``get_if_exists``), so running it twice changes nothing — except for a worker that
did not register or was started with other arguments, which a new start replaces
(:mod:`vela.worker.launch`), and control actors started with other settings, which
make the new start refuse (:func:`check_control_plane`)."""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors._ray import (
    API,
    AUTHORITY,
    LEGACY_GATEWAY,
    LISTENER,
    NAMESPACE,
    SCHEDULER,
    actor_error_cause,
    get_actor,
    legacy_worker_actor_name,
    worker_actor_name,
)
from actors.legacy_gateway import LegacyGatewayActor
from actors.legacy_worker import LegacyWorkerActor
from actors.queue_listener import QueueListenerActor
from actors.scheduler import SchedulerActor
from actors.token_authority import TokenAuthorityActor
from actors.worker import WorkerActor
from vela.config import Settings
from vela.errors import VelaError
from vela.launch import reuse_refusal, started_with
from vela.worker.launch import launch_spec, replace_reason, worker_settings

CONTROL = ((AUTHORITY, TokenAuthorityActor), (SCHEDULER, SchedulerActor),
           (LISTENER, QueueListenerActor))


def _options(name: str, namespace: str) -> dict[str, Any]:
    return dict(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                num_cpus=0, max_restarts=-1, max_task_retries=0)


def start_control_plane(settings: Settings, *, timeout_s: float = 120.0) -> dict[str, Any]:
    """TokenAuthority, Scheduler, QueueListener — and the LegacyGateway only if some
    route is in legacy queue mode — started together and confirmed ready; a
    :class:`VelaError` if control actors already run with other settings."""
    check_control_plane(settings)
    handles = create_control_plane(settings)
    wait_control_plane(handles, timeout_s=timeout_s)
    return handles


def check_control_plane(settings: Settings, *, timeout_s: float = 30.0) -> None:
    """Before creating any actor: refuse (:class:`VelaError`, naming the settings) if
    the control actors or the API already running in this namespace were started with
    other settings, or cannot say (:func:`vela.launch.reuse_refusal`). ``get_if_exists``
    would hand them back as they are, serving their own database. One dead for good
    counts as absent: its name is free and creating makes a new one."""
    ns = settings.ray.namespace
    salt = secrets.token_hex(16)  # a fresh key per check: no digest is worth collecting
    asked: dict[str, Any] = {}
    running: dict[str, dict[str, str] | None] = {}
    for name in (API, *(n for n, _ in CONTROL), LEGACY_GATEWAY):
        handle = get_actor(name, ns)
        if handle is None:
            continue
        try:
            asked[name] = handle.started_with.remote(salt)
        except AttributeError:  # an actor of a vela that cannot say
            running[name] = {}
    deadline = time.monotonic() + timeout_s
    for name, ref in asked.items():
        try:
            running[name] = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
        except (ActorUnavailableError, GetTimeoutError):
            running[name] = None  # restarting or stuck
        except RayActorError:
            pass  # dead for good
    refusal = reuse_refusal(running, started_with(settings, salt))
    if refusal is not None:
        raise VelaError(refusal)


def create_control_plane(settings: Settings) -> dict[str, Any]:
    """Create (or find) the control actors without waiting for them: each finds the
    others by name, which Ray registers as the actor is created. Call
    :func:`check_control_plane` first: found ones are returned as they run."""
    ns = settings.ray.namespace
    control: list[tuple[str, Any]] = list(CONTROL)
    if settings.queue.legacy_route_names():
        control.append((LEGACY_GATEWAY, LegacyGatewayActor))
    return {name: cls.options(**_options(name, ns)).remote(settings) for name, cls in control}


def wait_control_plane(handles: dict[str, Any], *, timeout_s: float = 120.0) -> None:
    ray.get([h.__ray_ready__.remote() for h in handles.values()], timeout=timeout_s)
    ray.get(handles[SCHEDULER].ready.remote(), timeout=timeout_s)
    if LEGACY_GATEWAY in handles:
        ray.get(handles[LEGACY_GATEWAY].ready.remote(), timeout=timeout_s)


def default_hostname() -> str:
    return socket.gethostname().split(".")[0] or "worker"


def _pinned(cls: Any, name: str, settings: Settings, node_id: str | None,
            max_restarts: int) -> Any:
    """``cls`` with our options, pinned to ``node_id`` (default: this driver's node)."""
    node = node_id or ray.get_runtime_context().get_node_id()
    return cls.options(
        **{**_options(name, settings.ray.namespace), "max_restarts": max_restarts},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))


def start_worker(settings: Settings, *, hostname: str, routes: list[str], build_limit: int,
                 state_dir: Path, registration_token: str | None = None,
                 node_id: str | None = None, max_restarts: int = -1,
                 timeout_s: float = 120.0) -> tuple[Any, dict[str, Any]]:
    """Start (or find) the WorkerActor for ``hostname`` pinned to ``node_id`` (default:
    this driver's node); wait until it registered. Returns the handle and its status,
    whose ``replaced`` says why a worker of that name was replaced (None: it was not).
    A worker that cannot start is a :class:`VelaError` saying why."""
    return _start_worker_actor(
        WorkerActor, worker_actor_name(hostname), "wait_registered", f"worker {hostname}",
        worker_settings(settings), hostname=hostname, routes=routes, build_limit=build_limit,
        state_dir=state_dir, node_id=node_id, max_restarts=max_restarts,
        timeout_s=timeout_s, registration_token=registration_token)


def start_legacy_worker(settings: Settings, *, hostname: str, routes: list[str],
                        build_limit: int, state_dir: Path, worker_secret: str,
                        node_id: str | None = None, max_restarts: int = -1,
                        timeout_s: float = 120.0) -> tuple[Any, dict[str, Any]]:
    """Start (or find) the LegacyWorkerActor for ``hostname`` pinned to ``node_id``
    (default: this driver's node); wait until the legacy gateway accepted it (its
    status says ``registered``; else ``error`` says why). ``replaced`` as for
    :func:`start_worker`."""
    return _start_worker_actor(
        LegacyWorkerActor, legacy_worker_actor_name(hostname), "wait_connected",
        f"legacy worker {hostname}", worker_settings(settings, legacy=True),
        hostname=hostname, routes=routes, build_limit=build_limit, state_dir=state_dir,
        node_id=node_id, max_restarts=max_restarts, timeout_s=timeout_s,
        worker_secret=worker_secret)


def _start_worker_actor(cls: Any, name: str, wait: str, what: str, settings: Settings, *,
                        hostname: str, routes: list[str], build_limit: int, state_dir: Path,
                        node_id: str | None, max_restarts: int, timeout_s: float,
                        **credential: Any) -> tuple[Any, dict[str, Any]]:
    """Either kind of worker actor: make way for it, start it pinned, and wait with its
    ``wait`` method; ``credential`` (its token or secret) goes to its constructor only."""
    state = str(state_dir.resolve())
    replaced = _make_way(name, settings.ray.namespace, launch_spec(
        settings, hostname=hostname, routes=routes, build_limit=build_limit, state_dir=state))
    handle = _pinned(cls, name, settings, node_id, max_restarts).remote(
        settings, hostname=hostname, routes=routes, build_limit=build_limit,
        state_dir=state, **credential)
    status = _started(getattr(handle, wait).remote(timeout_s), timeout_s + 30, what)
    return handle, {**status, "replaced": replaced}


def _make_way(name: str, namespace: str, spec: dict[str, Any], *,
              timeout_s: float = 30.0) -> str | None:
    """Keep the worker actor running as ``name`` if it is the one ``spec`` describes;
    else kill it and wait until its name is free. Returns why it was replaced."""
    handle = get_actor(name, namespace)
    if handle is None:
        return None
    try:
        status = ray.get(handle.status.remote(), timeout=timeout_s)
    except (RayActorError, GetTimeoutError):
        status = None  # dead, restarting or stuck: not a worker to keep
    reason = replace_reason(status, spec)
    if reason is None:
        return None
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while get_actor(name, namespace) is not None:  # the name is freed just after
        if time.monotonic() > deadline:
            raise VelaError(f"the actor {name} was replaced ({reason}) but its name is still "
                            f"taken after {timeout_s:.0f}s; try again")
        time.sleep(0.05)
    return reason


def _started(ref: Any, timeout_s: float, what: str) -> dict[str, Any]:
    """The status ``ref`` answers once the actor started; a constructor that failed
    (an unwritable state_dir, a refused key file, a bad build limit) in one line."""
    try:
        status: dict[str, Any] = ray.get(ref, timeout=timeout_s)
    except RayActorError as e:
        raise VelaError(f"{what} could not start: {actor_error_cause(e)}") from None
    except GetTimeoutError:
        raise VelaError(f"{what} did not answer within {timeout_s:.0f}s; its log in the Ray "
                        "dashboard says why") from None
    return status


def vela_actors(namespace: str = NAMESPACE) -> list[str]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == namespace]
    return sorted(names)


def stop_all(namespace: str = NAMESPACE) -> list[str]:
    """Kill every named actor of ours: the listener first, so nothing new is popped."""
    names = vela_actors(namespace)
    order = {LISTENER: 0, SCHEDULER: 2, LEGACY_GATEWAY: 2, AUTHORITY: 3}
    stopped = []
    for name in sorted(names, key=lambda n: order.get(n, 1)):
        handle = get_actor(name, namespace)
        if handle is not None:
            ray.kill(handle, no_restart=True)
            stopped.append(name)
    return stopped
