"""Database: units of work run whole, off the event loop on SQLite, all or nothing."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import func, select

from vela.db.engine import Database, create_engine, database
from vela.db.models import Repo
from vela.db.store import Store, utcnow


def _add_repo(s, name: str) -> None:  # type: ignore[no-untyped-def]
    s.add(Repo(org="o", name=name, full_name=f"o/{name}", timeout_s=60, counter=0,
               active=True, created_at=utcnow()))


async def _repos(db: Database) -> int:
    return int(await db.read(lambda s: s.scalar(select(func.count()).select_from(Repo))))


async def test_a_unit_that_raises_writes_nothing(engine):
    db = database(engine)

    def unit(s):  # type: ignore[no-untyped-def]
        _add_repo(s, "a")
        s.flush()
        raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"):
        await db.write(unit)
    assert await _repos(db) == 0
    await db.write(lambda s: _add_repo(s, "b"))
    assert await _repos(db) == 1


async def test_sqlite_units_run_in_the_database_thread_not_on_the_loop(engine):
    db = database(engine)
    loop_thread = threading.current_thread().name
    ran_in = await db.read(lambda s: threading.current_thread().name)
    if engine.dialect.name == "sqlite":
        assert ran_in.startswith("vela-db") and ran_in != loop_thread
        # A slow unit leaves the event loop free.
        started, release = threading.Event(), threading.Event()

        def slow(s):  # type: ignore[no-untyped-def]
            started.set()
            assert release.wait(10)
            return 1

        task = asyncio.ensure_future(db.read(slow))
        assert await asyncio.to_thread(started.wait, 10)
        assert not task.done()  # the loop runs on while the unit waits
        release.set()
        assert await task == 1
    else:
        assert ran_in == loop_thread  # asyncpg: on the loop, never blocking it


async def test_one_database_per_engine_and_dispose_closes_it(engine):
    db = database(engine)
    assert database(engine) is db
    await db.write(lambda s: _add_repo(s, "a"))
    thread = db._thread
    await engine.dispose()
    assert db._thread is None and (thread is None or thread._shutdown)
    # Like the engine, it opens again on next use.
    assert database(engine) is db and await _repos(db) == 1


def test_in_memory_sqlite_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="give the database a file"):
        Database(create_engine("sqlite+aiosqlite:///:memory:"))


async def test_stores_and_queues_of_one_engine_share_its_database(engine, master_key):
    from vela.queue.db_queue import DatabaseQueue

    store, queue = Store(engine, master_key), DatabaseQueue(engine)
    assert store._db is queue._db is database(engine)


async def test_an_engine_no_one_holds_is_freed_with_its_database(tmp_path):
    import gc
    import weakref

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'gone.db'}")
    db = weakref.ref(database(engine))
    await database(engine).read(lambda s: 1)
    await engine.dispose()
    gone = weakref.ref(engine)
    del engine
    gc.collect()
    assert gone() is None and db() is None


async def test_a_postgres_connection_that_died_idle_is_replaced_not_used(
        engine_postgres, monkeypatch):
    """A pooled connection idle past PING_AFTER_IDLE_S is pinged before use: one the
    server dropped meanwhile (a restart) is replaced, and the unit runs. Without the
    ping a write fails, which shows the test reaches the dead connection."""
    from sqlalchemy.exc import DBAPIError

    import vela.db.engine as eng
    from tests.conftest import pg_exec

    db = database(engine_postgres)

    async def kill_pooled() -> None:
        await engine_postgres.dispose()  # an empty pool: the read below leaves one in it
        pid = await db.read(lambda s: s.scalar(select(func.pg_backend_pid())))
        pg_exec(f"SELECT pg_terminate_backend({int(pid)})")

    monkeypatch.setattr(eng, "PING_AFTER_IDLE_S", 3600.0)  # never pinged
    await kill_pooled()
    with pytest.raises(DBAPIError):
        await db.write(lambda s: s.execute(select(1)))
    monkeypatch.setattr(eng, "PING_AFTER_IDLE_S", 0.0)  # always pinged
    await kill_pooled()
    assert await _repos(db) == 0
    await kill_pooled()
    assert await db.write(lambda s: s.scalar(select(1))) == 1


async def test_a_read_on_a_connection_dropped_in_steady_use_runs_once_more(
        engine_postgres, monkeypatch):
    """A connection in steady use is not pinged: when the server drops it (a restart),
    the read in flight fails and runs again on a new connection, so an API read does
    not answer 503 once after every PostgreSQL restart. A write would not run again."""
    import vela.db.engine as eng
    from tests.conftest import pg_exec

    monkeypatch.setattr(eng, "PING_AFTER_IDLE_S", 3600.0)  # never pinged
    db = database(engine_postgres)
    await engine_postgres.dispose()
    pid = await db.read(lambda s: s.scalar(select(func.pg_backend_pid())))
    pg_exec(f"SELECT pg_terminate_backend({int(pid)})")
    runs: list[int] = []

    def unit(s):  # type: ignore[no-untyped-def]
        runs.append(1)
        return s.scalar(select(func.pg_backend_pid()))

    assert await db.read(unit) != pid
    assert len(runs) == 2  # the first met the dropped connection


async def test_postgres_connections_stay_open_up_to_the_pool_size(pg_schema):
    """The Scheduler runs many units at once; connections beyond the pool size are
    opened and closed again for each burst (a new TLS attempt and statement cache each
    time). ``database.pool_size`` keeps that many open across bursts."""
    from sqlalchemy import event

    from tests.conftest import PG_URL
    from vela.config import Settings

    settings = Settings.model_validate({"database": {"pool_size": 12}})
    engine = create_engine(PG_URL, schema=pg_schema, pool_size=settings.database.pool_size)
    opened: list[int] = []
    event.listen(engine.sync_engine, "connect", lambda *_: opened.append(1))
    gate = asyncio.Barrier(12)

    async def unit() -> None:
        # Each holds its connection until all twelve are open at once.
        async with engine.connect() as conn:
            await gate.wait()
            await conn.execute(select(1))

    try:
        for _ in range(3):
            await asyncio.wait_for(asyncio.gather(*(unit() for _ in range(12))), 30)
        assert len(opened) == 12  # the first burst opened them; the next two reused them
    finally:
        await engine.dispose()
