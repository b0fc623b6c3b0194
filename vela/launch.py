"""What a start compares with the actors it finds already running under their names.

Vela's actors are named and detached, so a start finds those a previous one left
running. Whether they serve the new start depends on what they were started with:
a worker actor started otherwise is replaced (:mod:`vela.worker.launch`); the
control plane (TokenAuthority, Scheduler, QueueListener, the LegacyGateway and the
HTTP API) started otherwise makes `vela serve` refuse (:func:`reuse_refusal`) rather
than leave the user believing their new settings run. Plain code: ``actors/deploy.py``
asks the running actors (``started_with``) and acts on the answer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vela.config import Settings

# Settings no running control actor uses: the local workers' (their own start compares
# them), how this process reaches Ray and the local head's ports (the namespace is where
# the actors were found), and what the CLI calls and where it keeps its login.
NOT_SERVED = frozenset({"ray", "worker", "api.url", "api.credentials_file"})


def changed_keys(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between what a running actor was started
    with and what a new start asks for (a key on one side only differs)."""
    return [key for key in sorted(theirs.keys() | ours.keys())
            if theirs.get(key) != ours.get(key)]


def started_with(settings: Settings, salt: str) -> dict[str, str]:
    """What the control actors run with: every setting they use (``section.name``), as
    a digest of its value keyed with ``salt``. Equal values give equal digests under
    one salt, so a start compares its own with a running actor's without either value
    crossing Ray in clear (they include the database URL and the master key)."""
    from pydantic import SecretStr

    out: dict[str, str] = {}
    for section in type(settings).model_fields:
        model = getattr(settings, section)
        for name in type(model).model_fields:
            key = f"{section}.{name}"
            if section in NOT_SERVED or key in NOT_SERVED:
                continue
            value = getattr(model, name)
            if key == "database.url":  # unset, empty or spelled out: the same database
                value = settings.database_url()
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            text = json.dumps(value, default=str, sort_keys=True)
            out[key] = hmac.new(salt.encode(), text.encode(), hashlib.sha256).hexdigest()
    return out


def reuse_refusal(running: Mapping[str, Mapping[str, str] | None],
                  ours: Mapping[str, str]) -> str | None:
    """Why `vela serve` must not reuse the control actors in ``running`` (actor name →
    its :func:`started_with` answer; None: it did not answer, empty: it cannot say) when
    started with ``ours`` (:func:`started_with` with the same salt); None: every one runs
    with these settings, or none runs. Names settings, never values."""
    what = "stop that server with `vela stop`, then run `vela serve` again"
    changed = sorted({key for reported in running.values() if reported
                      for key in changed_keys(reported, ours)})
    if changed:
        return (f"a vela server already runs on this Ray cluster with other settings "
                f"({', '.join(changed)}): {what}")
    silent = sorted(name for name, reported in running.items() if reported is None)
    if silent:
        # One Ray is restarting comes back with the settings it was started with, which
        # it cannot tell us yet: reusing it blind is what this check is for.
        return (f"the running {', '.join(silent)} did not answer (restarting or stuck), so "
                f"whether it runs with these settings is unknown: {what}")
    mute = sorted(name for name, reported in running.items() if not reported)
    if mute:
        return (f"the running {', '.join(mute)} does not say what it was started with "
                f"(another vela version): {what}")
    return None
