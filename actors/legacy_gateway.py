"""LegacyGatewayActor: classic Vela's worker API, started only when some route is legacy.

A thin shell over :class:`vela.legacy.gateway.LegacyGateway`; `vela serve`
creates it (``actors/deploy.py``) only when ``queue.mode = "legacy"`` or
``queue.legacy_routes`` names a route, so a server-mode cluster has no such
door at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from actors._metrics import RayMetrics
from actors._started import StartedWith
from vela.config import Settings
from vela.legacy.gateway import LegacyGateway
from vela.server.context import ServerContext


@ray.remote
class LegacyGatewayActor(StartedWith):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._gateway: LegacyGateway | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LegacyGateway({', '.join(self._settings.queue.legacy_route_names())})"

    async def _get(self) -> LegacyGateway:
        async with self._lock:
            if self._gateway is None:
                ctx = ServerContext.open(self._settings)
                self._gateway = await ctx.legacy_gateway(metrics=RayMetrics())
            return self._gateway

    async def ready(self) -> bool:
        await self._get()
        return True

    async def hello(self, *, worker_secret: str, hostname: str, routes: list[str],
                    unknown_kid: bool = False) -> dict[str, Any]:
        return await (await self._get()).hello(worker_secret=worker_secret, hostname=hostname,
                                               routes=routes, unknown_kid=unknown_kid)

    async def claim(self, *, worker_secret: str, hostname: str,
                    build_id: int) -> dict[str, Any] | None:
        return await (await self._get()).claim(worker_secret=worker_secret, hostname=hostname,
                                               build_id=build_id)

    async def secrets(self, *, worker_secret: str, repo: str,
                      names: list[str]) -> dict[str, str]:
        return await (await self._get()).secrets(worker_secret=worker_secret, repo=repo,
                                                 names=names)

    async def report(self, *, worker_secret: str, hostname: str, build_id: int, action: str,
                     payload: dict[str, Any]) -> None:
        await (await self._get()).report(worker_secret=worker_secret, hostname=hostname,
                                         build_id=build_id, action=action, payload=payload)

    async def stats(self) -> dict[str, Any]:
        s = (await self._get()).stats
        return {"hellos": s.hellos, "claimed": s.claimed, "secret_reads": s.secret_reads,
                "reports": s.reports, "rejected": dict(s.rejected)}
