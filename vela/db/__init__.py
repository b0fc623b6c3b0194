"""Storage: SQLAlchemy 2 async on SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from vela.db.engine import create_engine
from vela.db.store import Store

__all__ = ["Store", "create_engine"]
