"""Wiring the server's parts from settings: one place, used by actors, CLI and tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from vela.config import Settings
from vela.db.engine import engine_from
from vela.db.store import Store
from vela.metrics import Metrics
from vela.queue import Queue, open_queue
from vela.queue.item import ItemSigner, ItemVerifier
from vela.queue.listener import Dispatcher, Listener
from vela.security import KeyRing, load_or_create_keyring
from vela.security.keys import PURPOSE_QUEUE, PURPOSE_TOKEN, RingHolder
from vela.server.authority import Authority
from vela.server.builds import BuildQueue
from vela.server.scheduler import AuthorityClient, Scheduler, WorkerDirectory

if TYPE_CHECKING:
    from vela.legacy.gateway import LegacyGateway


async def bootstrap_database(settings: Settings) -> None:
    """Migrations and first keys for ``settings``' database, then let go of it."""
    ctx = ServerContext.open(settings)
    try:
        await ctx.bootstrap()
    finally:
        await ctx.close()


@dataclass
class ServerContext:
    settings: Settings
    engine: AsyncEngine = field(repr=False)  # its URL may carry a password
    store: Store
    master_key: bytes = field(repr=False)  # decrypts every secret and server key

    @classmethod
    def open(cls, settings: Settings) -> ServerContext:
        engine = engine_from(settings)
        master_key = settings.master_key()
        return cls(settings=settings, engine=engine, store=Store(engine, master_key),
                   master_key=master_key)

    async def bootstrap(self) -> None:
        """Migrations and first keys, done once before any actor starts (so no two
        actors race to create a first key)."""
        from vela.db import migrate  # alembic: only `vela serve` and `vela db` migrate

        await migrate.upgrade(self.engine)
        await self.bootstrap_keys()

    def _now(self) -> datetime:
        return datetime.now(UTC)

    async def bootstrap_keys(self) -> None:
        for purpose in (PURPOSE_TOKEN, PURPOSE_QUEUE):
            await self._ring(purpose)

    async def _ring(self, purpose: str) -> KeyRing:
        return await load_or_create_keyring(self.store, purpose=purpose,
                                            master_key=self.master_key, now=self._now())

    async def keys(self, purpose: str, *, clock: Callable[[], datetime] | None = None
                   ) -> RingHolder:
        """The keys of ``purpose``, reloaded from the database every
        ``tokens.key_reload_s`` (so a `vela keys rotate` reaches this process)."""
        return await RingHolder.open(self.store, purpose=purpose, master_key=self.master_key,
                                     period_s=self.settings.tokens.key_reload_s,
                                     clock=clock or self._now)

    def queue(self) -> Queue:
        return open_queue(self.settings, engine=self.engine)

    async def authority(self) -> Authority:
        return await Authority.load(self.store, self.settings, self.master_key)

    async def build_queue(self, queue: Queue) -> BuildQueue:
        keys = await self.keys(PURPOSE_QUEUE)
        return BuildQueue(self.store, queue, ItemSigner.from_key(keys.ring.active),
                          self.settings.queue.routes, keys=keys)

    async def scheduler(self, queue: Queue, *, authority: AuthorityClient,
                        directory: WorkerDirectory, metrics: Metrics | None = None
                        ) -> Scheduler:
        return Scheduler(store=self.store, authority=authority, directory=directory,
                         builds=await self.build_queue(queue), settings=self.settings,
                         metrics=metrics)

    async def listener(self, queue: Queue, dispatcher: Dispatcher) -> Listener:
        keys = await self.keys(PURPOSE_QUEUE)
        q = self.settings.queue
        # Only server-mode routes: the listener never pops a route of legacy workers.
        verifier = ItemVerifier.from_public_keys(await keys.verifying_keys(),
                                                 q.server_route_names(), q.max_item_bytes)
        sched = self.settings.scheduler
        return Listener(queue, verifier, dispatcher, lease_s=q.lease_seconds,
                        batch=sched.dispatch_batch, wait_s=sched.listener_wait_s,
                        prefetch=sched.prefetch, keys=keys)

    async def legacy_gateway(self, *, metrics: Metrics | None = None) -> LegacyGateway:
        """Classic Vela's worker entry point; ConfigError unless some route is legacy."""
        from vela.legacy.gateway import LegacyGateway

        keys = await self.keys(PURPOSE_QUEUE)
        return LegacyGateway(store=self.store, settings=self.settings,
                             queue_keys=keys.verifying_keys,
                             reload_queue_keys=keys.reload_unknown, metrics=metrics)

    async def close(self) -> None:
        await self.engine.dispose()
