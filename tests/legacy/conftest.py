"""Legacy and mixed fleets in one event loop, without Ray: the server of
``tests/server`` plus the legacy gateway and LegacyWorkers pulling from the same
queue (SQLite + database queue, PostgreSQL + Redis)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import REDIS_URL
from tests.server.conftest import System
from vela.config import Settings
from vela.db.store import Store
from vela.executor import choose_runtime
from vela.legacy.gateway import LegacyGateway
from vela.legacy.worker import LegacyWorker
from vela.queue.db_queue import DatabaseQueue
from vela.queue.redis_queue import RedisQueue
from vela.server.context import ServerContext

WORKER_SECRET = "classic-shared-WORKER-SECRET-0123456789"


@dataclass
class Fleet(System):
    gateway: LegacyGateway | None = None
    legacy: dict[str, LegacyWorker] = field(default_factory=dict)

    async def start(self) -> None:
        await super().start()
        if self.settings.queue.legacy_route_names():
            self.gateway = await self.ctx.legacy_gateway(metrics=self.metrics)
        self.extra_passes.append(self._pull)

    async def _pull(self) -> None:
        for worker in self.legacy.values():
            await worker.run_until_idle(max_passes=100)

    def add_legacy_worker(self, hostname: str, *, routes: tuple[str, ...] = ("gpu",),
                          build_limit: int = 1, secret: str = WORKER_SECRET) -> LegacyWorker:
        assert self.gateway is not None, "no legacy route in this fleet"
        worker = LegacyWorker(
            hostname=hostname, routes=list(routes), build_limit=build_limit,
            runtime=choose_runtime(allow_unsandboxed=False, network=False),
            workspace_root=self.tmp / "legacy" / hostname, server=self.gateway,
            queue=self.queue, worker_secret=secret, reserve_timeout_s=0.05, flush_s=0.05,
            report_retry_s=0.01, report_deadline_s=5.0)
        self.legacy[hostname] = worker
        return worker

    async def close(self) -> None:
        for worker in self.legacy.values():
            await worker.close()
        await super().close()


def fleet_settings(tmp_path, **queue: Any) -> Settings:
    return Settings.model_validate({
        "server": {"data_dir": str(tmp_path), "worker_secret": WORKER_SECRET},
        "scheduler": {"health_check_period_s": 0.05, "health_check_timeout_s": 2.0,
                      "worker_lost_after_s": 1.0},
        "queue": {"lease_seconds": 30, **queue},
    })


async def open_fleet(engine, tmp_path, master_key, settings: Settings) -> Fleet:
    if engine.dialect.name == "sqlite":
        queue: Any = DatabaseQueue(engine)
    else:
        queue = RedisQueue(Redis.from_url(REDIS_URL), prefix=f"vela:test:{uuid.uuid4().hex[:12]}")
    ctx = ServerContext(settings=settings, engine=engine, store=Store(engine, master_key),
                        master_key=master_key)
    fleet = Fleet(settings=settings, ctx=ctx, tmp=tmp_path, queue=queue)
    await fleet.start()
    return fleet


@pytest.fixture
async def mixed(engine, tmp_path, master_key):
    """A fleet mid-migration: route ``vela`` in server mode, ``gpu`` still legacy."""
    fleet = await open_fleet(engine, tmp_path, master_key,
                             fleet_settings(tmp_path, routes=["vela", "gpu"],
                                            legacy_routes=["gpu"]))
    try:
        yield fleet
    finally:
        await fleet.close()


@pytest.fixture(params=["server", "legacy"])
async def fleet(request, engine, tmp_path, master_key):
    """One route, ``vela``, in either queue mode, with one worker of that mode
    (``fleet.worker_name``)."""
    mode = request.param
    fleet = await open_fleet(engine, tmp_path, master_key,
                             fleet_settings(tmp_path, routes=["vela"], mode=mode))
    try:
        if mode == "server":
            await fleet.add_worker("w1")
        else:
            fleet.add_legacy_worker("w1", routes=("vela",))
        yield fleet
    finally:
        await fleet.close()
