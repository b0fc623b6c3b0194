"""The whole server in one event loop, without Ray: Authority, Scheduler, Listener
and real WorkerCores (bubblewrap sandbox) wired through in-process stand-ins for
the Ray clients. Two back-end pairs: the embedded default (SQLite + database
queue) and production (PostgreSQL + Redis)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import REDIS_URL
from vela.coalesce import BatchingAuthority, Coalescer, answer_each, call_counts
from vela.config import Settings
from vela.db.store import Store
from vela.domain import BuildStatus
from vela.executor import Runtime, choose_runtime
from vela.metrics import RecordingMetrics
from vela.queue.db_queue import DatabaseQueue
from vela.queue.listener import Listener
from vela.queue.redis_queue import RedisQueue
from vela.security import Registration, load_or_create_identity
from vela.server.authority import Authority
from vela.server.context import ServerContext
from vela.server.scheduler import Scheduler, WorkerGone
from vela.worker import WorkerCore
from vela.worker.server_keys import ServerKeys

HELLO = """
version: "1"
steps:
  - name: greet
    commands:
      - echo "token is $API_TOKEN"
      - echo "$API_TOKEN" | base64
    secrets: [api_token]
  - name: check
    commands:
      - test -z "$API_TOKEN"
      - echo done
"""


def pipeline(*commands: str, secrets: tuple[str, ...] = ()) -> str:
    lines = ['version: "1"', "steps:", "  - name: main", "    commands:"]
    lines += [f"      - {c!r}" for c in commands]
    if secrets:
        lines.append(f"    secrets: [{', '.join(secrets)}]")
    return "\n".join(lines) + "\n"


class LocalWorkerClient:
    """What RayWorkerClient does, in process: challenges and packages sent at the same
    moment go in one batch call, answered as the WorkerActor answers them;
    ``kill()`` plays a dead actor."""

    def __init__(self, core: WorkerCore, tokens: dict[int, str]) -> None:
        self.core = core
        self.dead = False
        self.tokens = tokens
        self.answers: Coalescer[dict[str, Any], dict[str, Any]] = Coalescer(
            lambda batch: self._many(batch, self._availability))
        self.receipts: Coalescer[dict[str, Any], dict[str, Any]] = Coalescer(
            lambda batch: self._many(batch, self._execute_package))

    def _alive(self) -> None:
        if self.dead:
            raise WorkerGone("killed")

    async def _many(self, batch: list[Any], one: Any) -> list[Any]:
        self._alive()
        return await answer_each(batch, one)

    def call_counts(self) -> dict[str, dict[str, int]]:
        return call_counts(availability_many=self.answers, execute_packages=self.receipts)

    async def availability(self, challenge: dict[str, Any]) -> dict[str, Any]:
        return await self.answers.call(challenge)

    async def execute_package(self, package: dict[str, Any]) -> dict[str, Any]:
        return await self.receipts.call(package)

    async def _availability(self, challenge: dict[str, Any]) -> dict[str, Any]:
        return self.core.availability(challenge)

    async def _execute_package(self, package: dict[str, Any]) -> dict[str, Any]:
        if isinstance(package, dict) and isinstance(package.get("build_id"), int):
            self.tokens[package["build_id"]] = package.get("build_token")  # as a thief sees
        return (await self.core.execute_package(package)).as_dict()

    async def status(self) -> dict[str, Any]:
        self._alive()
        return self.core.status()

    async def cancel(self, build_id: int) -> bool:
        self._alive()
        return self.core.cancel(build_id)

    async def start_report(self, build_id: int) -> dict[str, Any] | None:
        self._alive()
        return self.core.start_report(build_id)

    async def kill(self) -> None:
        self.dead = True
        await self.core.close()


class Directory:
    def __init__(self) -> None:
        self.clients: dict[str, LocalWorkerClient] = {}

    async def connect(self, hostname: str, actor_name: str | None) -> LocalWorkerClient | None:
        client = self.clients.get(hostname)
        return client if client is not None and not client.dead else None


class DirectLink:
    """The worker's ServerLink straight into the Scheduler (reports are checked there);
    as RayServerLink, the reports of its builds ready at the same moment go in one
    ``reports_many`` call."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.calls: Coalescer[dict[str, Any], None] = Coalescer(
            lambda batch: system.scheduler.reports_many(batch))

    async def send_reports(self, *, build_id: int, token: str, proof: str,
                           reports: list[dict[str, Any]]) -> None:
        self.system.tokens[build_id] = token  # what a thief on the wire would see
        await self.calls.call({"build_id": build_id, "token": token, "proof": proof,
                               "reports": reports})


@dataclass
class System:
    settings: Settings
    ctx: ServerContext
    tmp: Path
    queue: Any
    authority: Authority = None  # type: ignore[assignment]
    scheduler: Scheduler = None  # type: ignore[assignment]
    listener: Listener = None  # type: ignore[assignment]
    directory: Directory = field(default_factory=Directory)
    tokens: dict[int, str] = field(default_factory=dict)
    metrics: RecordingMetrics = field(default_factory=RecordingMetrics)
    # More work for each pump pass (e.g. legacy workers' pull loops, tests/legacy).
    extra_passes: list[Any] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.ctx.store

    async def start(self) -> None:
        await self.ctx.bootstrap_keys()
        self.authority = await self.ctx.authority()
        self.scheduler = await self.ctx.scheduler(self.queue, authority=self.batching(),
                                                  directory=self.directory,
                                                  metrics=self.metrics)
        self.listener = await self.ctx.listener(self.queue, self.scheduler)
        self.listener.idle_s = 0.01
        self.listener.reserve_timeout_s = 0.05
        self.listener.wait_s = 0.05

    async def restart_scheduler(self) -> None:
        """A new Scheduler on the same DB and workers, as after a Ray restart."""
        self.scheduler = await self.ctx.scheduler(self.queue, authority=self.batching(),
                                                  directory=self.directory)
        self.listener.dispatcher = self.scheduler
        await self.scheduler.recover()

    def batching(self) -> BatchingAuthority:
        """The authority as the Scheduler sees it in production (actors/_ray.py:
        RayAuthority): one-build calls coalesced into its batch calls."""
        client = BatchingAuthority(self.authority.issue_packages, self.authority.verify_many)
        client.key_set = self.authority.key_set  # type: ignore[attr-defined]
        return client

    def identity(self, hostname: str):
        return load_or_create_identity(self.tmp / "workers" / hostname)

    async def add_worker(self, hostname: str, *, routes: tuple[str, ...] = ("vela",),
                         build_limit: int = 1, backlog: int = 0,
                         runtime: Runtime | None = None) -> WorkerCore:
        """A registered worker; its steps run in the bubblewrap sandbox unless
        ``runtime`` says otherwise."""
        state_dir = self.tmp / "workers" / hostname
        identity = self.identity(hostname)
        runtime = runtime or choose_runtime(allow_unsandboxed=False, network=False)
        # As the WorkerActor: it fetches the key set again after a rotation.
        server_keys = ServerKeys(state_dir, fetch=lambda: self.scheduler.key_set(),
                                 period_s=self.settings.tokens.key_reload_s)
        core = WorkerCore(hostname=hostname, routes=list(routes), build_limit=build_limit,
                          backlog=backlog, identity=identity, pinned_server_keys={},
                          runtime=runtime, server=DirectLink(self), workspace_root=state_dir / "ws",
                          flush_s=0.05, report_retry_s=0.01, report_deadline_s=5.0,
                          refresh_server_keys=server_keys.refresh)
        self.directory.clients[hostname] = LocalWorkerClient(core, self.tokens)
        token = await self.authority.registration_token(routes=list(routes), hostname=hostname)
        reg = Registration(hostname=hostname, routes=list(routes), build_limit=build_limit,
                           backlog=backlog, sign_public_key=identity.sign_public_key,
                           seal_public_key=identity.seal_public_key,
                           actor_name=f"vela-worker-{hostname}")
        key_set = await self.scheduler.register(reg.model_dump(mode="json"), token=token)
        core.pin(server_keys.pin(key_set).keys)
        return core

    async def submit(self, text: str, *, repo: str = "acme/app", route: str = "vela",
                     secrets: dict[str, str] | None = None, timeout_s: int | None = None) -> int:
        org, name = repo.split("/")
        for k, v in (secrets or {}).items():
            await self.store.put_secret("repo", org, name, k, v)
        build = await self.scheduler.builds.create(repo, text, route=route, timeout_s=timeout_s)
        return build.id

    async def pump(self, build_ids: list[int], *, timeout_s: float = 60.0,
                   until: Any = None) -> dict[int, Any]:
        """Run listener passes and worker checks until every build is terminal (or
        ``until(builds)`` holds); returns the builds. Fails on the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            builds = {b: await self.store.get_build(b) for b in build_ids}
            done = (until(builds) if until is not None
                    else all(BuildStatus(b.status).terminal for b in builds.values()))
            if done:
                return builds
            if loop.time() > deadline:
                raise AssertionError(f"timed out: { {k: v.status for k, v in builds.items()} }")
            await self.listener.run_until_idle(max_passes=100)
            await self.scheduler.check_workers()
            for extra in self.extra_passes:
                await extra()
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for client in self.directory.clients.values():
            await client.core.close()
        await self.queue.close()


@pytest.fixture
async def system(engine, tmp_path, master_key):
    """On SQLite: the embedded default (database queue); on PostgreSQL: production
    (Redis queue)."""
    settings = Settings.model_validate({
        "server": {"data_dir": str(tmp_path)},
        "scheduler": {"health_check_period_s": 0.05, "health_check_timeout_s": 2.0,
                      "worker_lost_after_s": 1.0},
        "queue": {"routes": ["vela", "gpu"], "lease_seconds": 30},
    })
    if engine.dialect.name == "sqlite":
        queue: Any = DatabaseQueue(engine)
    else:
        queue = RedisQueue(Redis.from_url(REDIS_URL), prefix=f"vela:test:{uuid.uuid4().hex[:12]}")
    ctx = ServerContext(settings=settings, engine=engine, store=Store(engine, master_key),
                        master_key=master_key)
    sys_ = System(settings=settings, ctx=ctx, tmp=tmp_path, queue=queue)
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


async def report_one(scheduler: Any, *, build_id: int, action: str, payload: dict[str, Any],
                     token: str, proof: str) -> None:
    """One report through :meth:`Scheduler.reports`, as a worker sends a single one."""
    await scheduler.reports(build_id=build_id, token=token, proof=proof,
                            reports=[{"action": action, "payload": payload}])
