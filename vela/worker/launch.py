"""Whether the worker actor already running under a name serves a new start of that
worker (`vela worker`, the local workers of `vela serve`) or must make way for it.

Worker actors are named and detached, so a start finds the one already running. That
one is kept only if it registered and was started with the same arguments; one whose
registration failed (no or a wrong token, a wrong worker secret) would otherwise keep
failing with its old arguments and hide the new ones. Plain code: ``actors/deploy.py``
asks the running actor for its status and acts on :func:`replace_reason`. (The control
actors are compared in :mod:`vela.launch`, and never replaced.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vela.launch import changed_keys

if TYPE_CHECKING:
    from vela.config import Settings

# Secrets stay out of a spec (it travels in the actor's status). A registration token
# is used once and a worker secret only proves who the worker is: neither makes
# another worker of it.
_SECRETS = frozenset({"registration_token", "worker_secret"})


def launch_spec(settings: Settings, *, hostname: str, routes: list[str], build_limit: int,
                state_dir: str) -> dict[str, Any]:
    """What a worker actor is started with: its ``worker.*`` settings, with the
    arguments that override them. Equal specs start the same worker."""
    spec = settings.worker.model_dump(mode="json", exclude=set(_SECRETS))
    spec.update(hostname=hostname, routes=list(routes), build_limit=build_limit,
                state_dir=state_dir)
    return spec


def worker_settings(settings: Settings, *, legacy: bool = False) -> Settings:
    """``settings`` as a worker actor is given them: never the master key (it decrypts
    every secret), the legacy worker secret (it reads them all) or a registration token
    (the constructor gets that alone). A legacy worker pops the queue itself, as classic
    Vela's do, so it keeps the URL of that queue: the database's on the database back
    end, Redis's on Redis, never the other; a server-mode worker gets neither."""
    from vela.config import DatabaseSettings, QueueSettings

    update: dict[str, Any] = {
        "server": settings.server.model_copy(update={"master_key": None,
                                                     "worker_secret": None}),
        "worker": settings.worker.model_copy(update=dict.fromkeys(_SECRETS))}
    pops = settings.queue.backend if legacy else None
    if pops != "database":
        update["database"] = DatabaseSettings()
    if pops != "redis":
        update["queue"] = settings.queue.model_copy(
            update={"redis_url": QueueSettings().redis_url})
    return settings.model_copy(update=update)


def replace_reason(status: Mapping[str, Any] | None, spec: Mapping[str, Any]) -> str | None:
    """Why the actor whose status is ``status`` (None: it does not answer) must make way
    for a worker started with ``spec``; None: it is that worker, keep it."""
    if status is None:
        return "it did not answer"
    theirs = status.get("spec")
    if not status.get("registered") and not (status.get("running") and theirs == spec):
        # One that runs builds with these settings registers again by itself (after a
        # Scheduler restart, say): replacing it would end its builds.
        return f"it is not registered ({status.get('error') or 'no answer from the server'})"
    if not theirs:
        return "it does not say what it was started with (another vela version)"
    changed = [f"{key} {theirs.get(key)!r}, not {spec.get(key)!r}"
               for key in changed_keys(theirs, spec)]
    if changed:
        return f"it was started with other settings: {'; '.join(changed)}"
    return None
