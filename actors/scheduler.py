"""Scheduler actor: the worker registry, dispatch, reports and worker watching.

A thin shell over :class:`vela.server.scheduler.Scheduler`. It builds itself
from the database on (re)start and keeps one watch loop running.

The server's modules are imported inside the methods that use them: Ray ships
this class by value to every process that looks the actor up by name (each
WorkerActor does), and a module a method names globally is imported there
too — SQLAlchemy, redis and the web framework in every worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import ray

from actors._started import StartedWith

if TYPE_CHECKING:
    from vela.api.backend import ServerBackend
    from vela.config import Settings
    from vela.domain import BuildStatus
    from vela.queue.item import QueueItem
    from vela.queue.listener import Capacity, SubmitResult
    from vela.server.context import ServerContext
    from vela.server.scheduler import Scheduler

log = logging.getLogger(__name__)


@ray.remote
class SchedulerActor(StartedWith):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._core: Scheduler | None = None
        self._lock = asyncio.Lock()
        self._ctx: ServerContext | None = None
        self._api: ServerBackend | None = None
        # Start recovering at once: a restarted Scheduler must re-adopt its workers.
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    def __repr__(self) -> str:
        return f"Scheduler({self._settings.server.id})"

    async def _get(self) -> Scheduler:
        from actors._metrics import RayMetrics
        from actors._ray import AUTHORITY, RayAuthority, RayWorkerDirectory, get_actor
        from vela.errors import VelaError
        from vela.server.context import ServerContext

        async with self._lock:
            if self._core is None:
                ctx = ServerContext.open(self._settings)
                handle = get_actor(AUTHORITY, self._settings.ray.namespace)
                if handle is None:
                    raise VelaError("the TokenAuthority actor is not running")
                core = await ctx.scheduler(ctx.queue(), authority=RayAuthority(handle),
                                           directory=RayWorkerDirectory(
                                               self._settings.ray.namespace),
                                           metrics=RayMetrics())
                await core.recover()
                self._ctx, self._core = ctx, core
            return self._core

    async def _watch_loop(self) -> None:
        period = self._settings.scheduler.health_check_period_s / 2
        while True:
            try:
                core = await self._get()
                await core.check_workers()
                await core.resync_queue()
                await core.end_overdue()
            except Exception:  # noqa: BLE001 - the loop never dies; the next pass retries
                log.exception("scheduler watch pass failed")
            await asyncio.sleep(period)

    async def ready(self) -> bool:
        await self._get()
        return True

    # -- listener ----------------------------------------------------------------
    async def capacity(self, wait_s: float = 0.0, seen_work: int | None = None) -> Capacity:
        return await (await self._get()).capacity(wait_s, seen_work)

    async def submit_many(self, items: list[QueueItem]) -> list[SubmitResult | Exception]:
        return await (await self._get()).submit_many(items)

    async def requeue_pending(self, build_ids: list[int]) -> int:
        return await (await self._get()).requeue_pending(build_ids)

    # -- workers -------------------------------------------------------------------
    async def register(self, registration: dict[str, Any], *, token: str,
                       running: list[int] | None = None) -> dict[str, Any]:
        return await (await self._get()).register(registration, token=token, running=running)

    async def reregister_challenge(self, hostname: str) -> dict[str, Any]:
        return (await self._get()).reregister_challenge(hostname)

    async def reregister(self, registration: dict[str, Any], *, challenge: dict[str, Any],
                         answer: dict[str, Any],
                         running: list[int] | None = None) -> dict[str, Any]:
        return await (await self._get()).reregister(registration, challenge=challenge,
                                                    answer=answer, running=running)

    async def checkin(self, hostname: str) -> bool:
        return await (await self._get()).checkin(hostname)

    async def key_set(self) -> dict[str, Any]:
        return await (await self._get()).key_set()

    async def worker_left(self, hostname: str) -> None:
        await (await self._get()).worker_left(hostname)

    async def reports_many(self, calls: list[dict[str, Any]]) -> list[None | Exception]:
        return await (await self._get()).reports_many(calls)

    # -- people and tools -------------------------------------------------------------
    async def create_build(self, repo: str, pipeline: str, *, route: str | None = None,
                           timeout_s: int | None = None) -> int:
        core = await self._get()
        build = await core.builds.create(repo, pipeline, route=route or core.builds.routes[0],
                                         timeout_s=timeout_s)
        return build.id

    async def put_secret(self, repo: str, name: str, value: str) -> None:
        from vela.domain import split_repo

        org, target = split_repo(repo)
        await (await self._get()).store.put_secret("repo", org, target, name, value)

    async def cancel(self, build_id: int) -> BuildStatus:
        return await (await self._get()).cancel(build_id)

    async def status(self) -> dict[str, Any]:
        return (await self._get()).status()

    async def api(self, op: str, kwargs: dict[str, Any]) -> Any:
        """One HTTP API operation (``vela.api.backend.OPS``) for the API actor
        (``actors/api.py``); failures come back as :class:`~vela.api.errors.ApiError`."""
        from vela.api.backend import ServerBackend, TokenIssuer, dispatch
        from vela.api.errors import to_api_error

        try:
            core = await self._get()
        except Exception as e:  # noqa: BLE001 - e.g. the TokenAuthority is not up yet
            raise to_api_error(e) from None
        if self._api is None:
            issuer: TokenIssuer = core.authority  # type: ignore[assignment] # RayAuthority
            self._api = ServerBackend(scheduler=core, issuer=issuer, settings=self._settings)
        return await dispatch(self._api, op, kwargs)

    async def build_view(self, build_id: int, after_log_id: int = 0) -> dict[str, Any]:
        from vela.server.builds import build_view

        return await build_view((await self._get()).store, build_id, after_log_id=after_log_id)
