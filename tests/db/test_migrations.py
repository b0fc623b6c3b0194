"""Migrations produce exactly the schema the models describe, on both back ends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from vela.db import migrate
from vela.db.engine import create_engine
from vela.db.models import Base


async def test_upgrade_matches_models(engine):
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    assert await migrate.current_revision(engine) is None
    await migrate.upgrade(engine)
    assert await migrate.current_revision(engine) == migrate.head_revision()
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
    assert diff == []
    await migrate.upgrade(engine)  # idempotent


async def test_upgrade_on_file_creates_directory(tmp_path):
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'deep' / 'dir' / 'vela.db'}")
    await migrate.upgrade(eng)
    assert await migrate.current_revision(eng) == migrate.head_revision()
    await eng.dispose()
