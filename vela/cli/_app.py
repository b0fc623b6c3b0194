"""The Typer app, the shared context and error handling for every command."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

from vela import __version__
from vela.config import Settings, load_settings
from vela.errors import ConfigError, VelaError

if TYPE_CHECKING:  # `import vela.cli` loads no SQLAlchemy
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

app = typer.Typer(
    help="Vela on Ray: CI builds pushed by the server to workers that prove who they are.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class CliState:
    config_path: Path | None = None
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings


state = CliState()


def _version(value: bool) -> None:
    if value:
        console.print(f"vela {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML configuration file (default: $VELA_CONFIG).",
        envvar="VELA_CONFIG",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    state.config_path = config
    state._settings = None


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def follow_again(build_id: int) -> str:
    """How to pick up a build this command stopped following."""
    return f"`vela build logs {build_id} --follow` picks it up again"


@contextlib.contextmanager
def following(build_id: int) -> Iterator[None]:
    """Ctrl-C while following a build stops the following, not the build: one line says
    so and what next, exit 130 (the shell's status for SIGINT)."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(f"stopped following build {build_id}, which carries on on the "
                          f"server: {follow_again(build_id)}, `vela build cancel {build_id}` "
                          "stops it", markup=False, highlight=False)
        raise typer.Exit(130) from None


def read_utf8(path: Path, fix: str) -> str:
    """The text of ``path``, which must be UTF-8; else a :class:`VelaError` that ends
    with ``fix``, what to do about it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VelaError(f"{path} is not UTF-8 text (at byte offset {e.start}): {fix}") from None
    except OSError as e:
        raise VelaError(f"cannot read {path}: {e.strerror}") from None


def command(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn our errors into one-line messages: config errors exit 2, others 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            raise fail(f"configuration: {e}", 2) from None
        except VelaError as e:
            raise fail(str(e)) from None

    return wrapper


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def on_database(work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``work`` with an engine for the configured database (disposed afterwards),
    for commands that use the database directly, without a running server. A database
    that cannot be reached or has no schema yet is a one-line error saying what to do."""
    from vela.db.engine import engine_from

    async def go() -> T:
        engine = engine_from(state.settings)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    try:
        return run(go())
    except OSError as e:  # refused connection and friends
        raise _database_error(e) from None
    except Exception as e:  # noqa: BLE001 - driver errors vary; report them in one line
        if type(e).__module__.startswith(("sqlalchemy", "asyncpg", "sqlite3")):
            raise _database_error(e) from None
        raise


def _database_error(e: Exception) -> typer.Exit:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return fail(f"cannot use the database: {first}. Check database.url (VELA_DATABASE_URL), "
                "that the database is running and that `vela db upgrade` ran.")


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))
