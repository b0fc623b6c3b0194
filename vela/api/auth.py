"""Who may call the API: the admin credential, API tokens and their scopes.

- The **admin credential** (``vac_...``) is created at the first `vela serve`,
  shown once and stored only as a SHA-256 hash (it is 256 random bits, so a
  plain hash is enough). It is never a bearer token: it is exchanged at
  ``POST /api/v1/login`` for an API token.
- An **API token** is an EdDSA JWT minted by the TokenAuthority with
  ``typ`` ``vela-api+jwt`` and audience ``vela:api``
  (:func:`vela.security.verify_api_token`), so a build token, a registration
  token or the credential itself never passes as one.
- **Scopes** say what a token may do; ``admin`` may do everything.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from vela.api.errors import ApiError, Code, unauthenticated
from vela.security import ApiClaims, Reason, Rejected, verify_api_token

if TYPE_CHECKING:  # the API actor checks tokens without loading SQLAlchemy
    from vela.db.store import Store

log = logging.getLogger(__name__)

CREDENTIAL_PREFIX = "vac_"
ADMIN_NAME = "admin"
# The longest lifetime a client may ask for a token it mints or logs in for.
MAX_TOKEN_TTL_S = 366 * 24 * 3600


class Scope(StrEnum):
    BUILDS_READ = "builds:read"      # repos, builds, steps, logs
    BUILDS_WRITE = "builds:write"    # create, cancel, restart builds
    SECRETS_READ = "secrets:read"    # secret names and dates (values are never readable)
    SECRETS_WRITE = "secrets:write"  # create, update, delete secrets
    WORKERS_READ = "workers:read"    # workers, queue depth, status
    WORKERS_WRITE = "workers:write"  # activate, deactivate workers
    ADMIN = "admin"                  # all of the above, registration tokens, minting tokens


def allows(granted: list[str], needed: Scope) -> bool:
    return Scope.ADMIN.value in granted or needed.value in granted


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- the admin credential ----------------------------------------------------------

def new_credential() -> str:
    return CREDENTIAL_PREFIX + secrets.token_urlsafe(32)


def hash_credential(credential: str) -> str:
    return hashlib.sha256(b"vela-api-credential\x00" + credential.encode()).hexdigest()


async def ensure_admin_credential(store: Store) -> str | None:
    """Create the admin credential on first start; returns it then (show it once),
    None when one exists already."""
    credential = new_credential()
    created = await store.add_api_credential(name=ADMIN_NAME,
                                             secret_hash=hash_credential(credential),
                                             scopes=[Scope.ADMIN.value])
    return credential if created else None


async def reset_admin_credential(store: Store) -> str:
    """A new admin credential in place of the old one (or the first); returns it (show
    it once)."""
    credential = new_credential()
    await store.put_api_credential(name=ADMIN_NAME, secret_hash=hash_credential(credential),
                                   scopes=[Scope.ADMIN.value])
    return credential


async def check_credential(store: Store, credential: str) -> tuple[str, list[str]]:
    """The credential's name and scopes, or ``bad_credential``."""
    row = None
    if credential.startswith(CREDENTIAL_PREFIX) and len(credential) < 200:
        row = await store.find_api_credential(hash_credential(credential))
    if row is None:
        raise ApiError(401, Code.BAD_CREDENTIAL,
                       "wrong credential; use the admin credential `vela serve` printed "
                       "at its first start")
    await store.touch_api_credential(row.id)
    return row.name, list(row.scopes)


# -- API tokens ---------------------------------------------------------------------

# {"issuer": str, "keys": {kid: Ed25519 public key}, "until": {kid: epoch s a retired key
# verifies until}, "revoked": {subject: epoch s}}
TokenKeys = dict[str, Any]


class Authenticator:
    """Checks bearer tokens against the server's verifying keys.

    Keys are fetched once and cached; an unknown ``kid`` (a rotation) refetches
    them, at most once per ``min_refresh_s``, and they are refetched every
    ``refresh_s`` anyway. A retired key comes with the instant it stops verifying and
    stops then, whenever the keys were fetched. Revoked subjects come with
    the keys: a token of one, issued before its revocation, is ``token_revoked``.
    """

    def __init__(self, load_keys: Callable[[], Awaitable[TokenKeys]], *,
                 clock: Callable[[], datetime] = _utcnow, refresh_s: float = 300.0,
                 min_refresh_s: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._load = load_keys
        self._clock = clock
        self._mono = monotonic
        self._refresh_s = refresh_s
        self._min_refresh_s = min_refresh_s
        self._keys: TokenKeys | None = None
        self._loaded_at = 0.0
        self._forgotten = 0  # forget() calls so far

    async def _current(self, *, force: bool = False) -> TokenKeys:
        age = self._mono() - self._loaded_at
        while (self._keys is None or age > self._refresh_s
               or (force and age > self._min_refresh_s)):
            forgotten = self._forgotten
            keys = await self._load()
            if forgotten == self._forgotten:
                self._keys, self._loaded_at = keys, self._mono()
                return keys
            # Forgotten while loading: what came may predate that revocation.
            force, age = False, 0.0
        return self._keys

    async def authenticate(self, token: str | None) -> ApiClaims:
        """The token's claims, or a 401 :class:`ApiError` naming the reason."""
        if not token:
            raise unauthenticated("this endpoint needs an API token: "
                                  "`Authorization: Bearer <token>` (see `vela login`)")
        keys = await self._current()
        try:
            return self._verify(token, keys)
        except Rejected as e:
            if e.reason is not Reason.UNKNOWN_KID:
                raise self._refused(e) from None
        keys = await self._current(force=True)
        try:
            return self._verify(token, keys)
        except Rejected as e:
            raise self._refused(e) from None

    def forget(self) -> None:
        """Fetch keys and revocations again before the next check (after a revocation),
        also where a fetch already under way began before it."""
        self._keys = None
        self._forgotten += 1

    def _verify(self, token: str, keys: TokenKeys) -> ApiClaims:
        now = self._clock()
        trusted = keys["keys"]
        if until := keys.get("until"):
            # A key retired since the fetch (`vela keys rotate --verify-for`) stops at its
            # instant here too, not when the keys are next fetched.
            t = now.timestamp()
            trusted = {kid: k for kid, k in trusted.items() if t < until.get(kid, math.inf)}
        claims = verify_api_token(token, keys=trusted, issuer=keys["issuer"], now=now)
        cut = keys.get("revoked", {}).get(claims.sub)
        if cut is not None and claims.iat < cut:
            raise Rejected(Reason.TOKEN_REVOKED, f"the tokens of {claims.sub!r} were revoked")
        return claims

    @staticmethod
    def _refused(e: Rejected) -> ApiError:
        log.info("API token refused: %s", e.reason.value)
        hint = " (run `vela login` again)" if e.reason is Reason.EXPIRED else ""
        return unauthenticated(f"invalid API token: {e}{hint}", e.reason.value)

    @staticmethod
    def authorize(claims: ApiClaims, needed: Scope) -> None:
        if not allows(claims.scp, needed):
            raise ApiError(403, Code.FORBIDDEN,
                           f"this token lacks the {needed.value!r} scope "
                           f"(it has: {', '.join(claims.scp) or 'none'})")
