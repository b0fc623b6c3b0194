"""`vela worker-token create`: one-time registration tokens for new workers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer

from vela.cli._app import command, console, err_console, on_database, print_json, state
from vela.cli.duration import parse_duration

if TYPE_CHECKING:  # `import vela.cli` loads no SQLAlchemy
    from sqlalchemy.ext.asyncio import AsyncEngine

app = typer.Typer(help="One-time registration tokens that onboard new workers.",
                  no_args_is_help=True)


@app.command("create")
@command
def create(
    routes: str = typer.Option("", "--routes", "-r",
                               help="Comma-separated routes the worker may serve "
                                    "(default: any of queue.routes)."),
    hostname: str | None = typer.Option(None, "--hostname",
                                        help="Bind the token to this worker hostname."),
    ttl: str = typer.Option("", "--ttl",
                            help="Lifetime, e.g. 15m, 1h (default: tokens.registration_ttl_s)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Mint a registration token. It is shown once and stored only as a hash."""
    s = state.settings
    ttl_s = parse_duration(ttl) if ttl else s.tokens.registration_ttl_s
    route_list = [r.strip() for r in routes.split(",") if r.strip()] or list(s.queue.routes)
    unknown = sorted(set(route_list) - set(s.queue.routes))
    if unknown:
        err_console.print(f"[yellow]warning:[/yellow] route(s) {', '.join(unknown)} are not in "
                          "queue.routes; no build will be queued there until they are.")

    from vela.db.store import Store
    from vela.security import create_registration_token

    async def go(engine: AsyncEngine) -> str:
        return await create_registration_token(Store(engine, s.master_key()),
                                               routes=route_list, hostname=hostname,
                                               ttl_s=ttl_s, now=datetime.now(UTC))

    token = on_database(go)
    if as_json:
        print_json({"token": token, "routes": route_list, "hostname": hostname, "ttl_s": ttl_s})
        return
    console.print(token, highlight=False, soft_wrap=True)
    err_console.print(f"valid once, for {ttl_s} s, routes {', '.join(route_list)}"
                      + (f", hostname {hostname}" if hostname else "")
                      + ". Give it to the worker as VELA_WORKER_REGISTRATION_TOKEN.",
                      highlight=False)
