"""WorkerActor: one per worker host, pinned to its Ray node.

A thin shell over :class:`vela.worker.WorkerCore`. On (re)start it loads or
creates its keys and registers with the Scheduler — with a registration
token the first time, by signing a challenge afterwards — then checks in
periodically and registers again whenever the Scheduler has forgotten it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import ray

from actors._ray import RayServerLink, worker_actor_name
from vela.coalesce import answer_each
from vela.config import Settings
from vela.executor import DEFAULT_HIDDEN_PATHS, choose_runtime
from vela.security import (
    Reason,
    Registration,
    Rejected,
    answer_challenge,
    load_or_create_identity,
)
from vela.security.challenge import Challenge
from vela.worker import WorkerCore
from vela.worker.launch import launch_spec
from vela.worker.server_keys import ServerKeys

log = logging.getLogger(__name__)


@ray.remote
class WorkerActor:
    def __init__(self, settings: Settings, *, hostname: str, routes: list[str],
                 build_limit: int, state_dir: str, registration_token: str | None = None) -> None:
        self.hostname = hostname
        self._settings = settings
        # What a later start of this worker compares with (actors/deploy.py).
        self._spec = launch_spec(settings, hostname=hostname, routes=routes,
                                 build_limit=build_limit, state_dir=state_dir)
        self._routes = list(routes)
        self._state_dir = Path(state_dir)
        # Taken once, then forgotten: after the first registration the key proves us.
        self._token = registration_token
        self._identity = load_or_create_identity(self._state_dir)
        ws = settings.worker
        runtime = choose_runtime(allow_unsandboxed=ws.allow_unsandboxed, network=ws.network,
                                 hidden_paths=(*DEFAULT_HIDDEN_PATHS, self._state_dir.resolve()))
        self._link = RayServerLink(settings.ray.namespace)
        self._server_keys = ServerKeys(self._state_dir,
                                       fetch=lambda: self._link.call("key_set"),
                                       period_s=settings.tokens.key_reload_s)
        workspace = self._state_dir / "workspaces"
        workspace.mkdir(parents=True, exist_ok=True)
        self.core = WorkerCore(
            hostname=hostname, routes=self._routes, build_limit=build_limit,
            identity=self._identity,
            pinned_server_keys=self._server_keys.keys,
            runtime=runtime, server=self._link, workspace_root=workspace, backlog=ws.backlog,
            batch_lines=ws.log_batch_lines, flush_s=ws.log_flush_s,
            refresh_server_keys=self._server_keys.refresh)
        self._registered = asyncio.Event()
        # Set once the server answered a registration: accepted, or refused for good.
        self._answered = asyncio.Event()
        self._error: str | None = None
        self._following: asyncio.Task[None] | None = None  # the key set fetch under way
        self._loop = asyncio.get_running_loop().create_task(self._checkin_loop())

    def __repr__(self) -> str:
        core = getattr(self, "core", None)  # None: the constructor failed
        if core is None:
            return f"WorkerActor({self.hostname}, not started)"
        return f"WorkerActor({self.hostname}, {len(core.running)}/{core.build_limit} running)"

    # -- registration ---------------------------------------------------------------
    def _registration(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return Registration(
            hostname=self.hostname, routes=self._routes, build_limit=self.core.build_limit,
            backlog=self.core.backlog, sign_public_key=self._identity.sign_public_key,
            seal_public_key=self._identity.seal_public_key,
            address=ray.util.get_node_ip_address(), ray_node_id=ctx.get_node_id(),
            actor_name=worker_actor_name(self.hostname)).model_dump(mode="json")

    async def _register(self) -> None:
        reg = self._registration()
        running = self.core.started  # the server queues held builds again
        key_set: dict[str, Any] | None = None
        if self._server_keys.pinned is not None:
            try:
                challenge = await self._link.call("reregister_challenge", self.hostname)
                answer = answer_challenge(Challenge.model_validate_json(json.dumps(challenge)),
                                          identity=self._identity, hostname=self.hostname,
                                          free_slots=self.core.free_slots)
                key_set = await self._link.call(
                    "reregister", reg, challenge=challenge,
                    answer=answer.model_dump(mode="json"), running=running)
            except Rejected as e:
                if e.reason is not Reason.WORKER_UNKNOWN or not self._token:
                    raise
                log.warning("server does not know this worker; registering with the token")
        if key_set is None:
            if not self._token:
                raise Rejected(Reason.REGISTRATION_UNKNOWN,
                               "no registration token: set VELA_WORKER_REGISTRATION_TOKEN "
                               "(mint one with `vela worker-token create`)")
            key_set = await self._link.call("register", reg, token=self._token, running=running)
            self._token = None
        self.core.pin(self._server_keys.pin(key_set).keys)

    async def _checkin_loop(self) -> None:
        period = self._settings.worker.checkin_period_s
        delay = 0.2
        while True:
            try:
                if not self._registered.is_set() or not await self._link.call(
                        "checkin", self.hostname):
                    self._registered.clear()
                    await self._register()
                    self._registered.set()
                    self._answered.set()
                    self._error = None
                    log.info("worker %s registered", self.hostname)
                self._follow_keys()
                delay = 0.2
                await asyncio.sleep(period)
            except Rejected as e:
                # Not transient: wrong or used token, unknown keys. Say so; keep trying
                # slowly in case an admin fixes it.
                self._error = str(e)
                self._answered.set()
                log.error("worker %s cannot register: %s", self.hostname, e)
                await asyncio.sleep(max(period, 5.0))
            except Exception as e:  # noqa: BLE001 - the scheduler may be (re)starting
                self._error = f"{type(e).__name__}: {e}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _follow_keys(self) -> None:
        """Follow the server's key set (once per reload period) in the background: a
        Scheduler slow to answer it must not hold the check-ins, which register the
        worker again once the Scheduler forgot it."""
        if self._following is None or self._following.done():
            self._following = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        keys = await self._server_keys.follow()
        if keys is not None:
            self.core.pin(keys)

    async def wait_registered(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Block until registered (or the timeout); returns :meth:`status`. A refusal
        (a wrong or used token, another vela version) returns at once with the error."""
        try:
            await asyncio.wait_for(self._answered.wait(), timeout_s)
        except TimeoutError:
            pass
        return await self.status()

    # -- the protocol -----------------------------------------------------------------
    async def availability(self, challenge: dict[str, Any]) -> dict[str, Any]:
        return self.core.availability(challenge)

    async def execute_package(self, package: dict[str, Any]) -> dict[str, Any]:
        return (await self.core.execute_package(package)).as_dict()

    # What the Scheduler sends this worker at the same moment travels in one call
    # (vela.coalesce): each challenge and each package answered on its own.
    async def availability_many(self, challenges: list[dict[str, Any]]
                                ) -> list[dict[str, Any] | Exception]:
        return await answer_each(challenges, self.availability)

    async def execute_packages(self, packages: list[dict[str, Any]]
                               ) -> list[dict[str, Any] | Exception]:
        return await answer_each(packages, self.execute_package)

    async def cancel(self, build_id: int) -> bool:
        return self.core.cancel(build_id)

    async def start_report(self, build_id: int) -> dict[str, Any] | None:
        return self.core.start_report(build_id)

    async def status(self) -> dict[str, Any]:
        return {**self.core.status(), "registered": self._registered.is_set(),
                "error": self._error, "pid": os.getpid(),
                "sandbox": type(self.core.runtime).__name__,
                "calls": self._link.call_counts(), "spec": self._spec}

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop taking builds, finish the running ones, leave the server, exit.

        On the timeout the worker keeps running (and draining) and the error says so."""
        await self.core.drain(timeout_s)
        try:
            await self._link.call("worker_left", self.hostname)
        finally:
            self._loop.cancel()
            ray.actor.exit_actor()
