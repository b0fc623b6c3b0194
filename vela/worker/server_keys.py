"""The server keys a worker trusts, kept in its state directory, and how it follows a
rotation of the server's token key.

At registration the worker pins the server's key set (:func:`~vela.security.pin_key_set`).
The worker fetches the server's current key set — public data, over its link to the
Scheduler — once a period as it checks in (:meth:`ServerKeys.follow`: a key rotated in
is known before it signs, a key the server stopped trusting is dropped), and when a
package comes signed by a key it has not pinned (``package_unknown_signer``). It pins a
set if, and only if, a key it pins already endorses it: a key set made by anyone else is
refused, and so are the packages it would have let in. On refusals, at most one fetch
per period (whoever can send packages with made-up kids cannot make it ask the server
more often), and packages refused together share one fetch.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from vela.reloading import Reloading
from vela.security import PinnedServer, load_pinned_server, pin_key_set, save_pinned_server

log = logging.getLogger("vela.worker")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ServerKeys:
    def __init__(self, state_dir: Path, *, fetch: Callable[[], Awaitable[object]],
                 period_s: float, clock: Callable[[], datetime] = _utcnow) -> None:
        self.state_dir = Path(state_dir)
        self.pinned: PinnedServer | None = load_pinned_server(self.state_dir)
        self._fetch = fetch
        self._refresh = Reloading(self._fetch_and_pin, None, period_s=period_s, clock=clock,
                                  what="server key set")

    @property
    def keys(self) -> dict[str, str]:
        """``{kid: public key}`` of the pinned server keys (none before registration)."""
        return dict(self.pinned.keys) if self.pinned is not None else {}

    def pin(self, key_set: object) -> PinnedServer:
        """Pin ``key_set`` (a registration's answer, or fetched) as
        :func:`~vela.security.pin_key_set` allows, and keep it in the state dir;
        :class:`~vela.security.Rejected` if it does not."""
        pinned = pin_key_set(key_set, pinned=self.pinned)
        save_pinned_server(self.state_dir, pinned)
        self.pinned = pinned
        return pinned

    async def refresh(self) -> dict[str, str] | None:
        """After a package of an unknown signer: the server's key set fetched and pinned
        (unless a fetch was made less than a period ago; a set refused or not fetched
        changes nothing), then the pinned keys, None before registration. The caller
        tries again if they are not the keys it tried with: they may have changed by a
        fetch that another refusal asked for, even one that ended just before."""
        await self._refresh.reload_on_demand()
        return self.keys or None

    async def follow(self) -> dict[str, str] | None:
        """Called as the worker checks in: once a period, the server's key set fetched and
        pinned, so a key rotated in is known before it signs, and a key the server no
        longer trusts (past its ``verify_until``, or cut by ``vela keys rotate
        --verify-for``) opens no package here a period later. The pinned keys; None
        before registration. A set no pinned key endorses changes nothing (logged)."""
        await self._refresh.fresh()
        return self.keys or None

    async def _fetch_and_pin(self) -> None:
        before = self.keys
        pinned = self.pin(await self._fetch())
        if pinned.keys != before:  # fetched once a period: logged when it changed only
            log.info("pinned the server's key set: %s", ", ".join(sorted(pinned.keys)))
