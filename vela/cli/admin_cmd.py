"""`vela admin-credential reset`: a new admin credential when the old one is lost.

It works on the database directly, with or without a running server, so whoever can
reach the server's database and master key can always take admin back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from vela.cli._app import command, console, err_console, on_database, print_json, state

if TYPE_CHECKING:  # `import vela.cli` loads no SQLAlchemy
    from sqlalchemy.ext.asyncio import AsyncEngine

app = typer.Typer(help="The admin credential (`vela login` exchanges it for an API token).",
                  no_args_is_help=True)


@app.command("reset")
@command
def reset_admin_credential(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Replace the admin credential: the old one stops working at once (API tokens
    already minted keep theirs until they expire). Shown once, stored only as a hash."""
    s = state.settings
    from vela.api.auth import reset_admin_credential as reset
    from vela.db.store import Store

    async def go(engine: AsyncEngine) -> str:
        return await reset(Store(engine, s.master_key()))

    credential = on_database(go)
    if as_json:
        print_json({"credential": credential})
        return
    console.print(credential, highlight=False, soft_wrap=True)
    err_console.print("the new admin credential, shown this once; the old one no longer "
                      "works. `vela login` exchanges it for an API token.", highlight=False)
