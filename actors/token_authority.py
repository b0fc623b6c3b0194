"""TokenAuthority actor: the only process holding the server's token signing keys."""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from actors._started import StartedWith
from vela.config import Settings
from vela.security import BuildClaims
from vela.server.authority import Authority, IssuedPackage
from vela.server.context import ServerContext


@ray.remote
class TokenAuthorityActor(StartedWith):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._authority: Authority | None = None
        self._lock = asyncio.Lock()

    async def _get(self) -> Authority:
        async with self._lock:
            if self._authority is None:
                self._authority = await ServerContext.open(self._settings).authority()
            return self._authority

    def __repr__(self) -> str:
        return f"TokenAuthority({self._settings.server.id})"

    # The Scheduler sends what its builds need at the same moment together (vela.coalesce).
    async def issue_packages(self, requests: list[tuple[int, str]]
                             ) -> list[IssuedPackage | Exception]:
        return await (await self._get()).issue_packages(requests)

    async def verify_many(self, requests: list[dict[str, Any]]
                          ) -> list[BuildClaims | Exception]:
        return await (await self._get()).verify_many(requests)

    async def key_set(self) -> dict[str, Any]:
        return await (await self._get()).key_set()

    async def registration_token(self, *, routes: list[str], hostname: str | None,
                                 ttl_s: int | None = None) -> str:
        return await (await self._get()).registration_token(routes=routes, hostname=hostname,
                                                            ttl_s=ttl_s)

    async def stats(self) -> dict[str, Any]:
        s = (await self._get()).stats
        return {"issued": s.issued, "verified": s.verified, "rejected": dict(s.rejected)}

    async def mint_api_token(self, *, subject: str, scopes: list[str],
                             ttl_s: int) -> dict[str, Any]:
        return await (await self._get()).mint_api_token(subject=subject, scopes=scopes,
                                                        ttl_s=ttl_s)
