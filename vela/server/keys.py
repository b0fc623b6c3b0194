"""Server key rotation, as an operator runs it (`vela keys`), on the database.

The database is the source of truth: a rotation stores a new key and retires the old
ones there, and every process holding keys follows it without a restart
(:class:`~vela.security.keys.RingHolder`, reloading every ``tokens.key_reload_s``).

The rule, for both purposes:

- The new key is published at once but signs only from ``switch_at`` = now + two
  reload periods, when the old keys retire: by then every holder has reloaded and
  verifies it (two periods: one for the reload, one for clocks and a failed reload).
- A retired key verifies until ``verify_until`` = ``switch_at`` + one reload period
  (a holder that could not reload may sign with it that much longer) + the longest
  lifetime of anything it signed: API tokens (``MAX_TOKEN_TTL_S``,
  ``api.token_ttl_s``), build tokens (:data:`~vela.server.builds.MAX_BUILD_TIMEOUT_S`
  + ``tokens.build_token_grace_s``), packages (``tokens.package_ttl_s``). A queue item
  has no lifetime — a build may wait in the queue for as long as no worker takes its
  route — so a retired queue key verifies as long as a token key does; an item still
  queued after that is dead-lettered ``unknown_kid`` and its build, if still pending,
  queued again with a fresh item (:meth:`~vela.queue.listener.Listener.run_once`).
- One rotation at a time per purpose: rotating again before the last one switched is
  refused (its new key would never be retired).

What rotation does not do: it revokes nothing. Whatever the old key signed stays
valid until it expires (``verify_for`` shortens that: see docs/security.md for the
procedure after a key is compromised).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from vela.api.auth import MAX_TOKEN_TTL_S
from vela.config import Settings
from vela.db.store import Store
from vela.errors import VelaError
from vela.security.keys import (
    PURPOSE_QUEUE,
    PURPOSE_TOKEN,
    load_or_create_keyring,
    rotate_keyring,
    signs_at,
    verifies_at,
)
from vela.server.builds import MAX_BUILD_TIMEOUT_S

PURPOSES = (PURPOSE_TOKEN, PURPOSE_QUEUE)


def _as_json(info: KeyInfo | Rotation) -> dict[str, object]:
    """What `vela keys --json` prints of ``info``: its fields, times in ISO form."""
    return {k: v.isoformat() if isinstance(v, datetime) else v
            for k, v in asdict(info).items()}


def retired_key_lifetime(settings: Settings) -> timedelta:
    """How long after it stops signing a server key must still verify: the longest
    anything it signed may live (see the module's docstring, queue keys included)."""
    t = settings.tokens
    return timedelta(seconds=max(MAX_TOKEN_TTL_S, settings.api.token_ttl_s,
                                 MAX_BUILD_TIMEOUT_S + t.build_token_grace_s,
                                 t.package_ttl_s))


@dataclass(frozen=True)
class KeyInfo:
    """What `vela keys list` shows of a server key: public facts only."""

    kid: str
    purpose: str
    created_at: datetime  # for a rotated-in key: when it begins to sign
    retired_at: datetime | None
    verify_until: datetime | None
    active: bool  # the one that signs now
    verifies: bool

    def as_dict(self) -> dict[str, object]:
        return _as_json(self)


async def list_keys(store: Store, *, now: datetime) -> list[KeyInfo]:
    """Every stored server key of both purposes, oldest first, without decrypting any."""
    out = []
    for purpose in PURPOSES:
        rows = await store.list_server_keys(purpose)
        # As KeyRing chooses: the newest that signs now.
        active = max((r for r in rows if signs_at(r, now)),
                     key=lambda r: (r.created_at, r.kid), default=None)
        out += [KeyInfo(kid=r.kid, purpose=purpose, created_at=r.created_at,
                        retired_at=r.retired_at, verify_until=r.verify_until,
                        active=r is active, verifies=verifies_at(r, now))
                for r in rows]
    return out


@dataclass(frozen=True)
class Rotation:
    purpose: str
    kid: str  # the new key
    retired: list[str]
    switch_at: datetime
    verify_until: datetime
    # Keys retired by earlier rotations whose verify_until a cut short one (verify_for)
    # brought forward to its own.
    cut: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return _as_json(self)


async def rotate_keys(store: Store, settings: Settings, master_key: bytes, *,
                      purposes: Iterable[str], now: datetime,
                      verify_for: timedelta | None = None) -> list[Rotation]:
    """Rotate the server keys of ``purposes`` by the module's rule. ``verify_for``: how
    long the old keys verify after the switch, instead of :func:`retired_key_lifetime`
    (0 after a compromise: whatever they signed dies at the switch) — every old key of
    the purpose, also one an earlier rotation retired that still verifies: it was kept
    where the compromised one was (same table, same master key, same processes). Refuses
    (before changing anything) a purpose whose last rotation has not switched yet."""
    period = timedelta(seconds=settings.tokens.key_reload_s)
    rings = []
    for purpose in purposes:
        if purpose not in PURPOSES:
            raise VelaError(f"no server keys of purpose {purpose!r}: "
                            f"{' or '.join(PURPOSES)}")
        ring = await load_or_create_keyring(store, purpose=purpose, master_key=master_key,
                                            now=now)
        pending = ring.rotating_until(now)
        if pending is not None:
            raise VelaError(f"the {purpose} key is being rotated: its new key signs from "
                            f"{pending.isoformat()}; rotate again after that")
        rings.append(ring)
    switch_at = now + 2 * period
    lifetime = retired_key_lifetime(settings) if verify_for is None else verify_for
    verify_until = switch_at + (period + lifetime if verify_for is None else lifetime)
    out = []
    for ring in rings:
        rotated = await rotate_keyring(store, ring, master_key=master_key, now=now,
                                       verify_until=verify_until, switch_at=switch_at)
        new = rotated.newest_since(ring)
        cut = []
        for k in ring.keys if verify_for is not None else ():
            if k.retired_at is not None and k.verify_until is not None \
                    and k.verify_until > verify_until:
                await store.retire_server_key(k.kid, retired_at=k.retired_at,
                                              verify_until=verify_until)
                cut.append(k.kid)
        out.append(Rotation(purpose=ring.purpose, kid=new.kid,
                            retired=[k.kid for k in ring.keys if k.retired_at is None],
                            switch_at=switch_at, verify_until=verify_until, cut=cut))
    return out
