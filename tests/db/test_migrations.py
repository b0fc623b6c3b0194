"""Migrations produce exactly the schema the models describe, on both back ends."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import column, table, text

from vela.db import migrate
from vela.db.engine import create_engine
from vela.db.models import Base, UTCDateTime


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


async def test_secrets_from_before_the_allowlist_get_an_empty_one(engine, master_key):
    """A shared secret stored before repo allowlists existed is given to no repo."""
    from vela.db.store import Store

    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    await migrate.upgrade(engine, "7c4e1a9b2d53")
    before = table("secrets", *(column(c) for c in ("scope", "org", "target", "name",
                                                    "value_enc")),
                   column("created_at", UTCDateTime()), column("updated_at", UTCDateTime()))
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(before.insert().values(
            scope="shared", org="acme", target="ops", name="k", value_enc=b"x",
            created_at=now, updated_at=now))
    await migrate.upgrade(engine)
    (info,) = await Store(engine, master_key).list_secrets(org="acme")
    assert (info.scope, info.name, info.repo_allowlist) == ("shared", "k", ())
