"""Which routes run in which queue mode, and the start-up checks that keep them apart.

A route is served either by the server (its QueueListener pops it and pushes
builds to queueless workers) or by legacy workers (they pop it themselves and
fetch secrets with the shared WORKER_SECRET), never both. The split comes
from ``queue.mode`` and ``queue.legacy_routes``
(:meth:`~vela.config.QueueSettings.legacy_route_names`); every check that
enforces it lives here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pydantic import SecretStr

from vela.config import Settings
from vela.errors import ConfigError
from vela.security import Reason, Rejected

# Shorter shared secrets are refused at start: this one reads every secret.
MIN_WORKER_SECRET_CHARS = 16


def _names(routes: Iterable[str]) -> str:
    return ", ".join(r[:64] for r in routes)


def check_queueless_routes(routes: Iterable[str], legacy_routes: Collection[str]) -> None:
    """A queueless worker may register only for server-mode routes."""
    clash = [r for r in routes if r in legacy_routes]
    if clash:
        raise Rejected(Reason.ROUTE_MODE_MISMATCH,
                       f"{_names(clash)} served by legacy workers; register this worker "
                       "for server-mode routes only, or run it with worker.mode = \"legacy\"")


def check_legacy_routes(routes: Iterable[str], legacy_routes: Collection[str]) -> None:
    """A legacy worker may pop only legacy routes."""
    routes = list(routes)
    if not routes:
        raise Rejected(Reason.ROUTE_MODE_MISMATCH, "a legacy worker needs at least one route")
    clash = [r for r in routes if r not in legacy_routes]
    if clash:
        raise Rejected(Reason.ROUTE_MODE_MISMATCH,
                       f"{_names(clash)} served in server mode (legacy routes: "
                       f"{_names(legacy_routes) or 'none'}); run this worker with "
                       "worker.mode = \"queueless\", or list the route in queue.legacy_routes")


def server_worker_secret(settings: Settings) -> str:
    """The WORKER_SECRET the server accepts; ConfigError when legacy mode is off or the
    secret is missing or short."""
    if not settings.queue.legacy_route_names():
        raise ConfigError("legacy queue mode is off (queue.mode = \"server\" and no "
                          "queue.legacy_routes): the server accepts no worker secret")
    return _secret(settings.server.worker_secret, "server.worker_secret",
                   "VELA_SERVER_WORKER_SECRET")


def worker_secret(settings: Settings) -> str:
    """The WORKER_SECRET a legacy worker presents (``worker.worker_secret``; for the
    local workers of `vela serve`, ``server.worker_secret`` when that is unset)."""
    if settings.worker.worker_secret is not None:
        return _secret(settings.worker.worker_secret, "worker.worker_secret",
                       "VELA_WORKER_WORKER_SECRET")
    if settings.server.worker_secret is not None:
        return _secret(settings.server.worker_secret, "server.worker_secret",
                       "VELA_SERVER_WORKER_SECRET")
    raise ConfigError("worker.mode = \"legacy\" needs the shared worker secret: set "
                      "VELA_WORKER_WORKER_SECRET to the server's server.worker_secret")


def _secret(value: SecretStr | None, key: str, env: str) -> str:
    hint = f"set {env}, e.g. to the output of `openssl rand -hex 32`"
    if value is None:
        raise ConfigError(f"{key} is not set: legacy queue mode needs the shared worker "
                          f"secret ({hint})")
    text = value.get_secret_value()
    if len(text) < MIN_WORKER_SECRET_CHARS:
        raise ConfigError(f"{key} must be at least {MIN_WORKER_SECRET_CHARS} characters "
                          f"({hint})")
    return text


def check_server_modes(settings: Settings) -> None:
    """What `vela serve` refuses before starting anything (the route split itself is
    checked when the settings load)."""
    if settings.queue.legacy_route_names():
        server_worker_secret(settings)


def check_worker_modes(settings: Settings, routes: Iterable[str]) -> None:
    """What `vela serve --local-workers` refuses: its workers take this config's mode
    and routes, so they must fit the server's split. (`vela worker` on another node is
    checked by the server when the worker starts: registration, or the legacy hello.)"""
    routes = list(routes)
    legacy = settings.queue.legacy_route_names()
    try:
        if settings.worker.mode == "legacy":
            check_legacy_routes(routes, legacy)
            worker_secret(settings)
        else:
            check_queueless_routes(routes, legacy)
    except Rejected as e:
        raise ConfigError(f"worker.routes / worker.mode: {e}") from None
