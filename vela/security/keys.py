"""Ed25519 public-key helpers and the server's signing keys (:class:`KeyRing`).

A server key has a ``kid`` (its RFC 7638 thumbprint). The newest key that has
begun to sign (``created_at``) and is not retired signs; retired keys keep verifying
until ``verify_until``, the instant after which no token they signed can still be
valid. A rotation publishes the new key before it signs: it verifies at once, but
signs only from its ``created_at``, when the old one retires (``rotate_keyring``), so
every holder that reloads its keys (:class:`RingHolder`) knows it before anything
signed with it arrives. Private halves are stored encrypted under the master key,
bound (AES-GCM associated data) to their kid and purpose, so a row copied to another
purpose or kid does not decrypt.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from vela.errors import ConfigError
from vela.reloading import Reloading
from vela.security import atrest
from vela.security._codec import b64u, b64u_decode, canonical_json, sha256_b64u
from vela.security.errors import Reason, Rejected

if TYPE_CHECKING:
    from vela.db.store import Store

log = logging.getLogger(__name__)

PURPOSE_TOKEN = "token"  # noqa: S105 - signs build/API tokens, packages, key sets
PURPOSE_QUEUE = "queue"  # signs queue items
KEY_BYTES = 32


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from unpadded base64url; ``malformed`` otherwise."""
    try:
        raw = b64u_decode(text)
        if len(raw) != KEY_BYTES:
            raise ValueError("wrong length")
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError):
        raise Rejected(Reason.MALFORMED, "not an Ed25519 public key") from None


def jwk_thumbprint(public_key: str) -> str:
    """RFC 7638 thumbprint of an Ed25519 key given as base64url (OKP, crv Ed25519)."""
    load_public_key(public_key)
    return sha256_b64u(canonical_json({"crv": "Ed25519", "kty": "OKP", "x": public_key}))


def verify_signature(public_key: str, data: bytes, signature: str) -> bool:
    try:
        load_public_key(public_key).verify(b64u_decode(signature), data)
    except (Rejected, ValueError, InvalidSignature):
        return False
    return True


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class _KeyTimes(Protocol):
    @property
    def created_at(self) -> datetime: ...
    @property
    def retired_at(self) -> datetime | None: ...
    @property
    def verify_until(self) -> datetime | None: ...


def verifies_at(key: _KeyTimes, now: datetime) -> bool:
    """A signature by ``key`` (a key or its stored row) may still be trusted at ``now``."""
    return key.retired_at is None or (key.verify_until is not None and now < key.verify_until)


def signs_at(key: _KeyTimes, now: datetime) -> bool:
    """``key`` has begun to sign (a rotated-in key waits for its turn) and is not
    retired yet at ``now``."""
    return key.created_at <= now and (key.retired_at is None or now < key.retired_at)


@dataclass(frozen=True, eq=False)
class SigningKey:
    """One server signing key. The private half never shows in ``repr``."""

    kid: str
    public_key: str
    created_at: datetime
    _private: Ed25519PrivateKey = field(repr=False)
    retired_at: datetime | None = None
    verify_until: datetime | None = None

    @classmethod
    def generate(cls, now: datetime) -> SigningKey:
        return cls._from_private(Ed25519PrivateKey.generate(), created_at=now)

    @classmethod
    def _from_private(cls, private: Ed25519PrivateKey, *, created_at: datetime,
                      retired_at: datetime | None = None,
                      verify_until: datetime | None = None) -> SigningKey:
        pub = b64u(public_bytes(private.public_key()))
        return cls(kid=jwk_thumbprint(pub), public_key=pub, created_at=created_at,
                   _private=private, retired_at=retired_at, verify_until=verify_until)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def verifies_at(self, now: datetime) -> bool:
        return verifies_at(self, now)

    def signs_at(self, now: datetime) -> bool:
        return signs_at(self, now)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("server signing keys never leave the TokenAuthority")


class KeyRing:
    """The signing keys of one purpose: one signs, all still-valid ones verify.

    Which one signs depends on ``now`` (a rotation switches keys at a set instant);
    without it, the newest key never retired."""

    def __init__(self, keys: Iterable[SigningKey], *, purpose: str = PURPOSE_TOKEN,
                 now: datetime | None = None) -> None:
        self.purpose = purpose
        self.keys: tuple[SigningKey, ...] = tuple(keys)
        active = [k for k in self.keys if now is not None and k.signs_at(now)]
        # Also where clocks disagree: a first key made on a host whose clock is ahead.
        active = active or [k for k in self.keys if k.retired_at is None]
        if not active:
            raise ConfigError(f"server keys ({purpose}): no active signing key")
        # Two servers starting at once may each create one; the newest signs.
        self.active = max(active, key=lambda k: (k.created_at, k.kid))

    @classmethod
    def generate(cls, now: datetime, *, purpose: str = PURPOSE_TOKEN) -> KeyRing:
        return cls([SigningKey.generate(now)], purpose=purpose)

    def sign(self, data: bytes) -> tuple[str, bytes]:
        return self.active.kid, self.active.sign(data)

    def verifying_keys(self, now: datetime) -> dict[str, str]:
        """``{kid: public key}`` of every key a signature may still come from."""
        return {k.kid: k.public_key for k in self.keys if k.verifies_at(now)}

    def rotated(self, *, now: datetime, verify_until: datetime,
                switch_at: datetime | None = None) -> KeyRing:
        """A ring with a new key that signs from ``switch_at`` (default ``now``), when
        every key not retired yet retires; they verify until ``verify_until``."""
        switch_at = switch_at or now
        retiring = [replace(k, retired_at=switch_at, verify_until=verify_until)
                    for k in self.keys if k.retired_at is None]
        others = [k for k in self.keys if k.retired_at is not None and k.verifies_at(now)]
        return KeyRing([*others, *retiring, SigningKey.generate(switch_at)],
                       purpose=self.purpose, now=now)

    def newest_since(self, before: KeyRing) -> SigningKey:
        """The key this ring has that ``before`` had not (the one a rotation made)."""
        known = {k.kid for k in before.keys}
        return next(k for k in self.keys if k.kid not in known)

    def rotating_until(self, now: datetime) -> datetime | None:
        """When the newest key begins to sign, if a rotation has not switched yet."""
        waiting = [k.created_at for k in self.keys
                   if k.retired_at is None and k.created_at > now]
        return max(waiting, default=None)

    def __repr__(self) -> str:
        return f"KeyRing({self.purpose}, active={self.active.kid}, keys={len(self.keys)})"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("server signing keys never leave the TokenAuthority")


def _aad(kid: str, purpose: str) -> bytes:
    return b"vela-server-key\x00" + purpose.encode() + b"\x00" + kid.encode()


def encrypt_private(key: SigningKey, master_key: bytes, purpose: str) -> bytes:
    raw = key._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return atrest.encrypt(master_key, raw, _aad(key.kid, purpose))


def decrypt_private(*, kid: str, purpose: str, private_enc: bytes, public_key: str,
                    master_key: bytes, created_at: datetime,
                    retired_at: datetime | None = None,
                    verify_until: datetime | None = None) -> SigningKey:
    """Raises :class:`atrest.DecryptionFailed` or :class:`ConfigError` on a bad row."""
    raw = atrest.decrypt(master_key, private_enc, _aad(kid, purpose))
    key = SigningKey._from_private(Ed25519PrivateKey.from_private_bytes(raw),
                                   created_at=created_at, retired_at=retired_at,
                                   verify_until=verify_until)
    if key.kid != kid or key.public_key != public_key:
        raise ConfigError(f"server key {kid}: stored public key does not match its private key")
    return key


async def load_or_create_keyring(store: Store, *, purpose: str, master_key: bytes,
                                 now: datetime) -> KeyRing:
    """The stored keys of ``purpose``; a first key is created if none is active."""
    keys = [decrypt_private(kid=r.kid, purpose=purpose, private_enc=r.private_enc,
                            public_key=r.public_key, master_key=master_key,
                            created_at=r.created_at, retired_at=r.retired_at,
                            verify_until=r.verify_until)
            for r in await store.list_server_keys(purpose)]
    keys = [k for k in keys if k.verifies_at(now)]
    if not any(k.retired_at is None for k in keys):
        new = SigningKey.generate(now)
        await _save(store, new, purpose=purpose, master_key=master_key)
        log.info("created server signing key", extra={"kid": new.kid, "purpose": purpose})
        keys.append(new)
    return KeyRing(keys, purpose=purpose, now=now)


async def rotate_keyring(store: Store, ring: KeyRing, *, master_key: bytes, now: datetime,
                         verify_until: datetime, switch_at: datetime | None = None
                         ) -> KeyRing:
    """Persist a new signing key that signs from ``switch_at`` (default ``now``), then
    retire the keys that sign until then (a crash between leaves two active keys,
    which is harmless: the newest signs, both verify, the next rotation retires both)."""
    rotated = ring.rotated(now=now, verify_until=verify_until, switch_at=switch_at)
    new = rotated.newest_since(ring)
    await _save(store, new, purpose=ring.purpose, master_key=master_key)
    retired = [k for k in ring.keys if k.retired_at is None]
    for key in retired:
        await store.retire_server_key(key.kid, retired_at=switch_at or now,
                                      verify_until=verify_until)
    log.info("rotated server signing key", extra={
        "kid": new.kid, "retired": [k.kid for k in retired], "purpose": ring.purpose})
    return rotated


class RingHolder:
    """One purpose's keys as the database has them, followed across rotations without a
    restart: reloaded before use once a period old (so a key rotated in, which signs
    only a while after it is stored, is known before anything it signed arrives), and
    when a signature names an unknown kid, at most once per period
    (:class:`~vela.reloading.Reloading`)."""

    def __init__(self, load: Callable[[], Awaitable[KeyRing]], ring: KeyRing, *,
                 period_s: float, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._keys = Reloading(load, ring, period_s=period_s, clock=clock,
                               what=f"server keys ({ring.purpose})")

    @classmethod
    async def open(cls, store: Store, *, purpose: str, master_key: bytes, period_s: float,
                   clock: Callable[[], datetime]) -> RingHolder:
        async def load() -> KeyRing:
            return await load_or_create_keyring(store, purpose=purpose,
                                                master_key=master_key, now=clock())

        return cls(load, await load(), period_s=period_s, clock=clock)

    @property
    def ring(self) -> KeyRing:
        """The keys as last loaded, the one that signs chosen for now."""
        loaded = self._keys.value
        return KeyRing(loaded.keys, purpose=loaded.purpose, now=self._clock())

    @property
    def loads(self) -> int:
        return self._keys.loads

    async def current(self) -> KeyRing:
        await self._keys.fresh()
        return self.ring

    async def verifying_keys(self) -> dict[str, str]:
        return (await self.current()).verifying_keys(self._clock())

    async def reload_unknown(self) -> bool:
        """A signature named a kid not among :meth:`verifying_keys`: reload, unless that
        was done less than a period ago (then False: refuse it as unknown)."""
        return await self._keys.reload_on_demand()

    def __repr__(self) -> str:
        return f"RingHolder({self.ring!r})"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("server signing keys never leave the process that loaded them")


async def _save(store: Store, key: SigningKey, *, purpose: str, master_key: bytes) -> None:
    await store.save_server_key(kid=key.kid, purpose=purpose,
                                private_enc=encrypt_private(key, master_key, purpose),
                                public_key=key.public_key, created_at=key.created_at)
