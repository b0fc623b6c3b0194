"""Shared fixtures: database engines on SQLite and real PostgreSQL.

PostgreSQL tests run in a schema of their own per test process, so parallel
runs on the same ``test`` database never drop each other's tables.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

from vela.db.engine import create_engine
from vela.db.models import Base

PG_URL = os.environ.get("VELA_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
PG_DSN = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
PG_SCHEMA = f"vela_test_{os.getpid()}"
REDIS_URL = os.environ.get("VELA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


async def _pg_exec(sql: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_exec(sql: str) -> None:
    """Run SQL on PostgreSQL from sync code, even inside a running event loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _pg_exec(sql)).result()


@pytest.fixture(scope="session")
def pg_schema():
    pg_exec(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE; CREATE SCHEMA {PG_SCHEMA}")
    yield PG_SCHEMA
    pg_exec(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")


async def fresh_engine(url: str, schema: str | None = None):
    engine = create_engine(url, schema=schema)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    return engine


@pytest.fixture
async def engine_sqlite(tmp_path):
    eng = await fresh_engine(f"sqlite+aiosqlite:///{tmp_path / 'vela.db'}")
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
async def engine_postgres(pg_schema):
    eng = await fresh_engine(PG_URL, pg_schema)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request):
    """A fresh schema on each back end (PostgreSQL at 127.0.0.1:5432/test)."""
    return request.getfixturevalue(f"engine_{request.param}")


@pytest.fixture
def master_key() -> bytes:
    return bytes(range(32))


# One Ray for the whole session: a real ray.cluster_utils.Cluster (head node, token
# authentication on), so tests that lose a node can add and remove worker nodes.
@pytest.fixture(scope="session")
def cluster():
    from vela.cli.serve_cmd import ensure_ray_auth_token

    ensure_ray_auth_token()  # a fresh machine has none; auth stays on
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
