"""open_queue picks the back end from settings."""

from __future__ import annotations

import uuid

from tests.conftest import REDIS_URL
from vela.config import load_settings
from vela.db.models import Base
from vela.queue import RouteDepth, open_queue
from vela.queue.db_queue import DatabaseQueue
from vela.queue.redis_queue import RedisQueue


async def test_database_backend_with_a_given_engine_leaves_it_open(tmp_path):
    from vela.db.engine import create_engine

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'given.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    settings = load_settings(environ={"VELA_SERVER_DATA_DIR": str(tmp_path)})
    async with open_queue(settings, engine=engine) as q:
        assert isinstance(q, DatabaseQueue)
        await q.push("vela", b"x")
    async with engine.connect():  # still usable after the queue closed
        pass
    async with open_queue(settings, engine=engine) as q:
        assert await q.depth() == {"vela": RouteDepth(ready=1)}
    await engine.dispose()


async def test_database_backend_defaults_to_the_embedded_sqlite(tmp_path):
    settings = load_settings(environ={"VELA_SERVER_DATA_DIR": str(tmp_path)})
    q = open_queue(settings)
    assert isinstance(q, DatabaseQueue)
    async with q._engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await q.push("vela", b"x")
    await q.close()
    assert (tmp_path / "vela.db").exists()


async def test_redis_backend(tmp_path):
    settings = load_settings(environ={"VELA_QUEUE_BACKEND": "redis",
                                      "VELA_QUEUE_REDIS_URL": REDIS_URL})
    prefix = f"vela:test:{uuid.uuid4().hex[:12]}"
    q = open_queue(settings, redis_prefix=prefix)
    assert isinstance(q, RedisQueue) and q.prefix == prefix
    try:
        item_id = await q.push("vela", b"x")
        res = await q.reserve(["vela"], lease_s=5)
        assert res.id == item_id and await q.ack(res)
        assert await q.depth() == {}
    finally:
        keys = [k async for k in q._r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await q._r.delete(*keys)
        await q.close()


def test_redis_client_must_return_bytes():
    import pytest
    from fakeredis import FakeAsyncRedis

    from vela.queue import QueueError

    with pytest.raises(QueueError):
        RedisQueue(FakeAsyncRedis(decode_responses=True))
