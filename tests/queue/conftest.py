"""Queue fixtures: one parametrization over the four back ends, clocks, keys, a fake scheduler.

Tests marked ``on_all_backends`` run on fakeredis, real Redis (db 15), SQLite
and PostgreSQL. The database ones use the shared ``engine`` fixture; it is
parametrized indirectly so each back end is paired with the right engine
(the Redis back ends get a throwaway SQLite one they never touch).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakeredis import FakeAsyncRedis, FakeServer
from redis.asyncio import Redis
from sqlalchemy import delete

from tests.conftest import REDIS_URL
from vela.db.models import QueueItem as QueueRow
from vela.domain import DEFAULT_ROUTE
from vela.queue import (
    Capacity,
    ItemSigner,
    ItemVerifier,
    Outcome,
    Queue,
    QueueItem,
    Rejected,
    SubmitResult,
)
from vela.queue.db_queue import DatabaseQueue
from vela.queue.listener import submit_each
from vela.queue.redis_queue import RedisQueue

BACKENDS = [("fakeredis", "sqlite"), ("redis", "sqlite"), ("sqlite", "sqlite"),
            ("postgres", "postgres")]
ROUTES = (DEFAULT_ROUTE, "gpu")


# Mark a test (or a module, via ``pytestmark``) to run on every back end.
on_all_backends = pytest.mark.parametrize(
    ("backend_name", "engine"), BACKENDS, indirect=["engine"], ids=[b for b, _ in BACKENDS],
)


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Backend:
    """Makes isolated queues on one back end; ``fake_server`` lets a test pull the plug."""

    name: str
    _make: Callable[..., Awaitable[Queue]]
    fake_server: FakeServer | None = None
    opened: list[Queue] = field(default_factory=list)

    async def new(self, clock: Callable[[], float], **kwargs) -> Queue:
        """An empty queue (fresh key prefix, or an emptied table)."""
        q = await self._make(clock, **kwargs)
        self.opened.append(q)
        return q


@pytest.fixture
async def backend(backend_name, engine):
    if backend_name in ("fakeredis", "redis"):
        server = FakeServer() if backend_name == "fakeredis" else None
        client = FakeAsyncRedis(server=server) if server is not None else Redis.from_url(REDIS_URL)
        prefixes: list[str] = []

        async def make(clock, **kwargs) -> Queue:
            prefixes.append(f"vela:test:{uuid.uuid4().hex[:12]}")
            return RedisQueue(client, prefix=prefixes[-1], clock=clock, **kwargs)

        b = Backend(backend_name, make, fake_server=server)
        try:
            yield b
        finally:
            if server is not None:
                server.connected = True
            # Only our own keys: other runs may share db 15.
            for prefix in prefixes:
                keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
                if keys:
                    await client.delete(*keys)
            await client.aclose()
        return

    async def make_db(clock, **kwargs) -> Queue:
        async with engine.begin() as conn:
            await conn.execute(delete(QueueRow))
        return DatabaseQueue(engine, clock=clock, **kwargs)

    yield Backend(backend_name, make_db)


@pytest.fixture
async def queue(backend, clock) -> Queue:
    return await backend.new(clock)


# -- signing ---------------------------------------------------------------


@pytest.fixture(scope="session")
def queue_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def signer(queue_key) -> ItemSigner:
    return ItemSigner(queue_key, "q1")


@pytest.fixture(scope="session")
def verifier(queue_key) -> ItemVerifier:
    return ItemVerifier({"q1": queue_key.public_key()}, ROUTES, max_bytes=4096)


# -- a scheduler that records ---------------------------------------------


class FakeScheduler:
    """Builds in memory; dispatch moves pending -> running exactly like the real CAS."""

    def __init__(self, free: set[str] | None = None) -> None:
        self.free = set(ROUTES if free is None else free)
        self.builds: dict[int, str] = {}
        self.dispatched: list[int] = []
        self.submitted: list[QueueItem] = []
        self.answer: Callable[[QueueItem], Awaitable[SubmitResult | None]] | None = None
        self.requeue_asked: list[list[int]] = []

    def add(self, build_id: int, status: str = "pending") -> None:
        self.builds[build_id] = status

    async def capacity(self, wait_s: float = 0.0, seen_work: int | None = None) -> Capacity:
        return Capacity(dict.fromkeys(self.free, 1), total=len(self.free))

    async def submit_many(self, items: list[QueueItem]) -> list[SubmitResult | Exception]:
        return await submit_each(self.submit, items)

    async def requeue_pending(self, build_ids: list[int]) -> int:
        self.requeue_asked.append(list(build_ids))
        return sum(self.builds.get(b) == "pending" for b in build_ids)

    async def submit(self, item: QueueItem) -> SubmitResult:
        self.submitted.append(item)
        if self.answer is not None:
            forced = await self.answer(item)
            if forced is not None:
                return forced
        status = self.builds.get(item.build_id)
        if status is None:
            return Rejected("build_not_found", f"build {item.build_id}")
        if status != "pending":
            return Outcome.NOT_PENDING
        self.builds[item.build_id] = "running"
        self.dispatched.append(item.build_id)
        return Outcome.DISPATCHED


@pytest.fixture
def scheduler() -> FakeScheduler:
    return FakeScheduler()


def signed(signer: ItemSigner, build_id: int, route: str = DEFAULT_ROUTE, **kw) -> bytes:
    return signer.sign(QueueItem.new(build_id, route, now=1_700_000_000.0, **kw))
