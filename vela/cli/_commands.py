"""Front-door commands: configuration and database."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from vela.cli import (  # noqa: F401 - registers commands
    admin_cmd,
    client_cmd,
    keys_cmd,
    queue_cmd,
    serve_cmd,
    worker_token_cmd,
)
from vela.cli._app import app, command, console, on_database, print_json, state
from vela.config import redacted

if TYPE_CHECKING:  # `import vela.cli` loads no SQLAlchemy
    from sqlalchemy.ext.asyncio import AsyncEngine

config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema: apply migrations, check the connection.",
                     no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(queue_cmd.app, name="queue")
app.add_typer(worker_token_cmd.app, name="worker-token")
app.add_typer(admin_cmd.app, name="admin-credential")
app.add_typer(keys_cmd.app, name="keys")


@config_app.command("show")
@command
def config_show(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the effective configuration (defaults < file < VELA_* env), secrets redacted."""
    data = redacted(state.settings)
    if as_json:
        print_json(data)
        return
    for section, values in data.items():
        console.print(f"[{section}]", style="bold", markup=False, highlight=False)
        for key, value in values.items():
            console.print(f"{key} = {json.dumps(value)}", markup=False, highlight=False)
        console.print()


@db_app.command("upgrade")
@command
def db_upgrade() -> None:
    """Apply every pending migration to the configured database."""
    from vela.db import migrate

    async def go(engine: AsyncEngine) -> tuple[str | None, str | None]:
        before = await migrate.current_revision(engine)
        await migrate.upgrade(engine)
        return before, await migrate.current_revision(engine)

    before, after = on_database(go)
    if before == after:
        console.print(f"database already at schema {after} (latest)")
    else:
        console.print(f"database upgraded from {before or 'empty'} to schema {after}")


@db_app.command("check")
@command
def db_check(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Connect to the configured database and report its schema version."""
    from vela.db import migrate

    current = on_database(migrate.current_revision)
    head = migrate.head_revision()
    up_to_date = current == head
    backend = state.settings.database_url().split(":", 1)[0]
    if as_json:
        print_json({"backend": backend, "schema": current, "latest": head,
                    "up_to_date": up_to_date})
    else:
        table = Table(show_header=False)
        table.add_row("backend", backend)
        table.add_row("schema", current or "empty (run `vela db upgrade`)")
        table.add_row("latest", head)
        console.print(table)
    if not up_to_date:
        raise typer.Exit(1)

