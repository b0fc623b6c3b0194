"""PostgreSQL administration for the benchmarks (databases of their own)."""

from __future__ import annotations

import asyncio

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def pg_admin(*sql: str) -> None:
    """Run statements one by one (outside a transaction, as CREATE DATABASE needs)."""
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            for stmt in sql:
                await conn.execute(stmt)
        finally:
            await conn.close()

    asyncio.run(go())
