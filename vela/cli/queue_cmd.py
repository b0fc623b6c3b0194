"""`vela queue`: depth per route, dead letters, requeue."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.table import Table

from vela.cli._app import command, console, fail, print_json, run, state

if TYPE_CHECKING:  # the queue's libraries (redis, SQLAlchemy) load when a command runs
    from vela.queue import Queue

T = TypeVar("T")

app = typer.Typer(help="The build queue: depth per route, dead letters, requeue.",
                  no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON.")


def _with_queue(action: Callable[[Queue], Awaitable[T]]) -> T:
    from vela.queue import is_transient, open_queue

    async def go() -> T:
        queue = open_queue(state.settings)
        try:
            return await action(queue)
        finally:
            await queue.close()

    try:
        return run(go())
    except Exception as e:
        # Missing tables surface as driver errors too; one line says what to check.
        if not is_transient(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        backend = state.settings.queue.backend
        where = ("queue.redis_url (VELA_QUEUE_REDIS_URL)" if backend == "redis"
                 else "database.url (VELA_DATABASE_URL) and run `vela db upgrade`")
        raise fail(f"cannot reach the {backend} queue: {first}. Check {where}.") from None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@app.command("stats")
@command
def stats(as_json: bool = JSON_OPTION) -> None:
    """Items ready, in flight and dead-lettered, per route."""
    from vela.queue import RouteDepth

    depth = _with_queue(lambda q: q.depth())
    rows = {r: RouteDepth() for r in state.settings.queue.routes}
    rows.update(depth)
    if as_json:
        print_json({"backend": state.settings.queue.backend,
                    "routes": {r: d.as_dict() for r, d in rows.items()}})
        return
    table = Table(title=f"queue ({state.settings.queue.backend})")
    table.add_column("route")
    for name in ("ready", "in flight", "dead"):
        table.add_column(name, justify="right")
    for route, d in rows.items():
        table.add_row(route, str(d.ready), str(d.in_flight), str(d.dead))
    console.print(table)


@app.command("dead-letters")
@command
def dead_letters(limit: int = typer.Option(50, "--limit", "-n", min=1, help="Show at most N."),
                 as_json: bool = JSON_OPTION) -> None:
    """Items the listener refused, newest first, with the reason code."""
    from vela.queue.item import peek

    letters = _with_queue(lambda q: q.dead_letters(limit))
    # Unverified: whatever the payload claims, to help find the build.
    builds = [(peek(d.payload) or {}).get("build_id") for d in letters]
    builds = [b if isinstance(b, int) and not isinstance(b, bool) else None for b in builds]
    if as_json:
        print_json([
            {"id": d.id, "route": d.route, "reason": d.reason, "detail": d.detail,
             "dead_at": d.dead_at, "created_at": d.created_at, "deliveries": d.deliveries,
             "build_id": build, "bytes": len(d.payload)}
            for d, build in zip(letters, builds, strict=True)
        ])
        return
    if not letters:
        console.print("no dead letters")
        return
    table = Table()
    for name in ("id", "route", "reason", "build", "dead at (UTC)", "detail"):
        table.add_column(name, overflow="fold")
    for d, build in zip(letters, builds, strict=True):
        table.add_row(d.id, d.route, d.reason, "" if build is None else str(build),
                      _when(d.dead_at), d.detail)
    console.print(table)


@app.command("requeue")
@command
def requeue(item_id: str = typer.Argument(..., metavar="ID", help="A dead letter's id."),
            as_json: bool = JSON_OPTION) -> None:
    """Put a dead letter back at the tail of its route (it gets a new id)."""
    new_id = _with_queue(lambda q: q.requeue(item_id))
    if as_json:
        print_json({"requeued": item_id, "id": new_id})
    else:
        console.print(f"requeued dead letter {item_id} as item {new_id}", highlight=False)
