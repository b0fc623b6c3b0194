"""`vela keys rotate | list`: the server's signing keys.

They work on the database directly, as `vela worker-token` does: the database is where
every server process loads its keys from, and reloads them every `tokens.key_reload_s`,
so a rotation reaches a running system without a restart (vela/server/keys.py has the
rule). Public facts only: no command shows or takes a private key.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from vela.cli._app import command, console, err_console, on_database, print_json, state
from vela.cli.duration import parse_duration

if TYPE_CHECKING:  # `import vela.cli` loads no SQLAlchemy
    from sqlalchemy.ext.asyncio import AsyncEngine

app = typer.Typer(help="The server's signing keys: rotate them, list them (public facts only).",
                  no_args_is_help=True)

PURPOSES = ("token", "queue")


def _when(t: datetime | None) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if t is not None else ""


@app.command("rotate")
@command
def rotate(
    purpose: str = typer.Argument(
        "all", metavar="[token|queue|all]",
        help="token: signs build and API tokens, packages and key sets; queue: signs "
             "queue items; all (default): both."),
    verify_for: str = typer.Option(
        "", "--verify-for",
        help="How long the old keys verify after the new one takes over, e.g. 0 or 1h "
             "(default: the longest lifetime of anything they signed); also keys retired "
             "by earlier rotations that verify longer. 0 after a compromise: whatever "
             "they signed dies then (docs/security.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """A new key signs two reload periods from now (`tokens.key_reload_s`), when every
    running server process knows it; the old one verifies until what it signed can
    have expired. Running servers follow without a restart."""
    from vela.errors import VelaError

    if purpose not in (*PURPOSES, "all"):
        raise VelaError(f"unknown purpose {purpose!r}: token, queue or all")
    purposes = PURPOSES if purpose == "all" else (purpose,)
    cut = None
    if verify_for:
        cut = timedelta(seconds=parse_duration(verify_for, zero_ok=True))
    s = state.settings

    from vela.db.store import Store
    from vela.server.keys import Rotation, rotate_keys

    async def go(engine: AsyncEngine) -> list[Rotation]:
        master_key = s.master_key()
        return await rotate_keys(Store(engine, master_key), s, master_key,
                                 purposes=purposes, now=datetime.now(UTC), verify_for=cut)

    rotations = on_database(go)
    if as_json:
        print_json([r.as_dict() for r in rotations])
        return
    for r in rotations:
        console.print(f"{r.purpose}: new key {r.kid} signs from {_when(r.switch_at)} UTC; "
                      f"{', '.join(r.retired) or 'no key'} retired then, verifying until "
                      f"{_when(r.verify_until)} UTC"
                      + (f"; so does {', '.join(r.cut)} (retired before)" if r.cut else ""),
                      highlight=False, soft_wrap=True)
    err_console.print("running servers pick the new keys up within "
                      f"{s.tokens.key_reload_s:g} s (tokens.key_reload_s), workers as they check "
                      "in (worker.checkin_period_s).", highlight=False)


@app.command("list")
@command
def list_keys(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every stored server key: kid, purpose, created (a rotated-in key: when it begins
    to sign), retired, verify until, whether it signs now."""
    from vela.db.store import Store
    from vela.server.keys import KeyInfo
    from vela.server.keys import list_keys as infos

    s = state.settings

    async def go(engine: AsyncEngine) -> list[KeyInfo]:
        return await infos(Store(engine, s.master_key()), now=datetime.now(UTC))

    keys = on_database(go)
    if as_json:
        print_json([k.as_dict() for k in keys])
        return
    if not keys:
        console.print("no server keys yet: `vela serve` (or `vela keys rotate`) makes them")
        return
    table = Table()
    for name in ("purpose", "kid", "created (UTC)", "retired (UTC)", "verifies until (UTC)",
                 "active"):
        table.add_column(name, overflow="fold")
    for k in keys:
        table.add_row(k.purpose, k.kid, _when(k.created_at), _when(k.retired_at),
                      _when(k.verify_until) if k.retired_at else "",
                      "yes" if k.active else "")
    console.print(table)
