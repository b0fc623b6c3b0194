"""Alembic environment. Always called with a connection from vela.db.migrate."""

from alembic import context

from vela.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `vela db upgrade` (vela.db.migrate)")

context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
