"""Ed25519 public-key helpers and the server's signing keys (:class:`KeyRing`).

A server key has a ``kid`` (its RFC 7638 thumbprint). The newest active key
signs; retired keys keep verifying until ``verify_until``, the instant after
which no token they signed can still be valid. Private halves are stored
encrypted under the master key, bound (AES-GCM associated data) to their kid
and purpose, so a row copied to another purpose or kid does not decrypt.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

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
        return self.retired_at is None or (self.verify_until is not None
                                           and now < self.verify_until)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("server signing keys never leave the TokenAuthority")


class KeyRing:
    """The signing keys of one purpose: one signs, all still-valid ones verify."""

    def __init__(self, keys: Iterable[SigningKey], *, purpose: str = PURPOSE_TOKEN) -> None:
        self.purpose = purpose
        self.keys: tuple[SigningKey, ...] = tuple(keys)
        active = [k for k in self.keys if k.retired_at is None]
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

    def rotated(self, *, now: datetime, verify_until: datetime) -> KeyRing:
        """A ring whose new key signs; the old active key verifies until ``verify_until``."""
        old = replace(self.active, retired_at=now, verify_until=verify_until)
        others = [k for k in self.keys if k is not self.active and k.verifies_at(now)]
        return KeyRing([*others, old, SigningKey.generate(now)], purpose=self.purpose)

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
    return KeyRing(keys, purpose=purpose)


async def rotate_keyring(store: Store, ring: KeyRing, *, master_key: bytes, now: datetime,
                         verify_until: datetime) -> KeyRing:
    """Persist a new signing key, then retire the old one (a crash between leaves
    two active keys, which is harmless: the newest signs, both verify)."""
    rotated = ring.rotated(now=now, verify_until=verify_until)
    await _save(store, rotated.active, purpose=ring.purpose, master_key=master_key)
    await store.retire_server_key(ring.active.kid, retired_at=now, verify_until=verify_until)
    log.info("rotated server signing key",
             extra={"kid": rotated.active.kid, "retired": ring.active.kid})
    return rotated


async def _save(store: Store, key: SigningKey, *, purpose: str, master_key: bytes) -> None:
    await store.save_server_key(kid=key.kid, purpose=purpose,
                                private_enc=encrypt_private(key, master_key, purpose),
                                public_key=key.public_key, created_at=key.created_at)
