"""Worker onboarding: one-time registration tokens, and re-registration by signature.

An admin mints a registration token (``vrt_`` + 32 random bytes); only its
SHA-256 is stored. A new worker registers its hostname, routes, build limit
and public keys with it, once, before it expires. A known worker re-registers
after a restart by answering a challenge with its registered key; it cannot
change its keys or widen its routes that way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vela.domain import MAX_BACKLOG
from vela.security._codec import b64u, b64u_decode
from vela.security.challenge import Answer, Challenge, ChallengeBook, Purpose
from vela.security.errors import Reason, Rejected
from vela.security.keys import jwk_thumbprint, load_public_key
from vela.security.tokens import REGISTRATION_PREFIX

if TYPE_CHECKING:
    from vela.db.models import RegistrationToken, Worker
    from vela.db.store import Store

log = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"^vrt_[A-Za-z0-9_-]{43}$")
HOSTNAME_RE = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,248}[A-Za-z0-9])?$"  # fits workers.hostname
ROUTE_RE = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,249}$"


def mint_registration_token() -> tuple[str, str]:
    """``(token, sha256 hex)``: show the token once, store only the hash."""
    token = REGISTRATION_PREFIX + b64u(os.urandom(32))
    return token, hash_registration_token(token)


def hash_registration_token(token: object) -> str:
    """SHA-256 hex of a well-formed registration token; ``wrong_type`` for any other
    credential (a JWT, a build or API token), ``malformed`` for garbage."""
    if not isinstance(token, str):
        raise Rejected(Reason.MALFORMED, "not a registration token")
    if not token.startswith(REGISTRATION_PREFIX):
        if token.count(".") == 2:
            raise Rejected(Reason.WRONG_TYPE, "a signed token is not a registration token")
        raise Rejected(Reason.MALFORMED, "not a registration token")
    if not _TOKEN_RE.match(token):
        raise Rejected(Reason.MALFORMED, "not a registration token")
    return hashlib.sha256(token.encode("ascii")).hexdigest()


# What server and workers say to each other (packages, receipts, report calls and their
# proofs). Bump it with any change the other side's previous version cannot follow: a
# worker of another protocol is refused at registration, not at every build.
# 1: until 2026-12-07 (a proof per report, sent without the field); 2: one proof per
# report call, over the call's reports.
WORKER_PROTOCOL = 2


class Registration(BaseModel):
    """What a worker declares about itself when it registers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: int = Field(default=WORKER_PROTOCOL, ge=1, le=1_000_000)

    hostname: str = Field(pattern=HOSTNAME_RE)
    routes: list[str] = Field(min_length=1, max_length=64)
    build_limit: int = Field(ge=1, le=1024)
    # Packages it holds beyond build_limit until a slot frees (worker.backlog).
    backlog: int = Field(default=0, ge=0, le=MAX_BACKLOG)
    sign_public_key: str
    seal_public_key: str
    address: str = Field(default="", max_length=500)
    ray_node_id: str | None = Field(default=None, max_length=100)
    actor_name: str | None = Field(default=None, max_length=300)

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: list[str]) -> list[str]:
        if any(not re.match(ROUTE_RE, r) for r in v):
            raise ValueError("invalid route name")
        return sorted(set(v))

    @field_validator("sign_public_key")
    @classmethod
    def _sign_key(cls, v: str) -> str:
        try:
            load_public_key(v)
        except Rejected:
            raise ValueError("not an Ed25519 public key") from None
        return v

    @field_validator("seal_public_key")
    @classmethod
    def _seal_key(cls, v: str) -> str:
        if len(b64u_decode(v)) != 32:
            raise ValueError("not an X25519 public key")
        return v

    @property
    def thumbprint(self) -> str:
        return jwk_thumbprint(self.sign_public_key)

    @classmethod
    def from_wire(cls, data: object) -> Registration:
        """A registration as the server takes it: well formed, and from a worker of this
        server's :data:`WORKER_PROTOCOL` (one that does not name its protocol speaks 1)."""
        try:
            reg = data if isinstance(data, Registration) else cls.model_validate(data)
        except ValidationError:
            raise Rejected(Reason.MALFORMED, "not a worker registration") from None
        spoken = reg.protocol if not isinstance(data, dict) or "protocol" in data else 1
        if spoken != WORKER_PROTOCOL:
            raise Rejected(Reason.WORKER_PROTOCOL_MISMATCH,
                           f"worker {reg.hostname} speaks protocol {spoken}, this server "
                           f"{WORKER_PROTOCOL}")
        return reg


def check_registration(record: RegistrationToken | None, registration: Registration, *,
                       known_thumbprint: str | None, now: datetime) -> None:
    """Whether ``record`` (the stored token, or None) admits ``registration``.

    ``known_thumbprint`` is the key thumbprint of an already registered worker
    of that hostname: only a token bound to that hostname may re-key it, so a
    leaked unbound token cannot take over an existing worker.
    """
    if record is None:
        raise Rejected(Reason.REGISTRATION_UNKNOWN)
    if record.used_at is not None:
        raise Rejected(Reason.REGISTRATION_USED)
    if now >= record.expires_at:
        raise Rejected(Reason.REGISTRATION_EXPIRED)
    if record.hostname is not None and record.hostname != registration.hostname:
        raise Rejected(Reason.REGISTRATION_MISMATCH, f"token is for {record.hostname}")
    if record.routes and not set(registration.routes) <= set(record.routes):
        raise Rejected(Reason.REGISTRATION_MISMATCH, "routes beyond the token's")
    if (known_thumbprint is not None and known_thumbprint != registration.thumbprint
            and record.hostname is None):
        raise Rejected(Reason.REGISTRATION_MISMATCH,
                       f"{registration.hostname} is registered with other keys; mint a "
                       "token bound to that hostname to re-key it")


async def create_registration_token(store: Store, *, routes: list[str], hostname: str | None,
                                    ttl_s: int, now: datetime) -> str:
    """Mint and store a registration token; returns the token (show it once)."""
    token, digest = mint_registration_token()
    await store.create_registration_token(token_hash=digest, routes=list(routes),
                                          hostname=hostname,
                                          expires_at=now + timedelta(seconds=ttl_s))
    return token


async def register_worker(store: Store, registration: Registration, *, token: object,
                          now: datetime) -> Worker:
    """Redeem ``token`` (once) for ``registration``; returns the stored worker."""
    digest = hash_registration_token(token)
    record = await store.get_registration_token(digest)
    known = await store.find_worker(registration.hostname)
    check_registration(record, registration, now=now,
                       known_thumbprint=known.key_thumbprint if known else None)
    if known is not None and not known.active:
        # Any token, bound or not: deactivation holds until an admin activates it.
        raise Rejected(Reason.WORKER_DISABLED, f"activate {registration.hostname} first "
                       f"(`vela workers --activate {registration.hostname}`)")
    if not await store.use_registration_token(digest, used_by=registration.hostname, now=now):
        # Lost a race with another redemption (or expired in between).
        check_registration(await store.get_registration_token(digest), registration,
                           known_thumbprint=None, now=now)
        raise Rejected(Reason.REGISTRATION_USED)
    worker = await _save(store, registration)
    log.info("worker registered", extra={"worker": registration.hostname,
                                         "thumbprint": worker.key_thumbprint})
    return worker


async def reregister_worker(store: Store, registration: Registration, *, book: ChallengeBook,
                            challenge: Challenge, answer: Answer, now: datetime) -> Worker:
    """A known worker proves itself with its registered key; no token needed."""
    known = await store.find_worker(registration.hostname)
    if known is None:
        raise Rejected(Reason.WORKER_UNKNOWN, "register with a registration token first")
    if challenge.purpose is not Purpose.REREGISTER:
        raise Rejected(Reason.CHALLENGE_MISMATCH, "not a re-registration challenge")
    book.consume(challenge, answer, sign_public_key=known.sign_public_key, now=now)
    if not known.active:
        raise Rejected(Reason.WORKER_DISABLED)
    if (registration.sign_public_key != known.sign_public_key
            or registration.seal_public_key != known.seal_public_key):
        raise Rejected(Reason.REGISTRATION_MISMATCH, "new keys need a new registration token")
    if not set(registration.routes) <= set(known.routes):
        raise Rejected(Reason.REGISTRATION_MISMATCH, "routes beyond the registered ones")
    worker = await _save(store, registration)
    log.info("worker re-registered", extra={"worker": registration.hostname})
    return worker


async def _save(store: Store, registration: Registration) -> Worker:
    return await store.upsert_worker(
        registration.hostname, routes=registration.routes,
        build_limit=registration.build_limit, backlog=registration.backlog,
        sign_public_key=registration.sign_public_key,
        seal_public_key=registration.seal_public_key, key_thumbprint=registration.thumbprint,
        address=registration.address, ray_node_id=registration.ray_node_id,
        actor_name=registration.actor_name)
