"""Encryption to a worker's X25519 key: ephemeral X25519 + HKDF-SHA256 + AES-256-GCM.

Only the holder of the worker's private key can open a box; the associated
data binds it to where it belongs (build, worker, package), so a box lifted
into another package does not open.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ConfigDict, Field

from vela.security._codec import b64u, b64u_decode
from vela.security.errors import Reason, Rejected

if TYPE_CHECKING:
    from vela.security.identity import WorkerIdentity

_INFO = b"vela-seal-v1"
_NONCE = 12
_TAG = 16


class SealedBox(BaseModel):
    """``epk``: the sender's ephemeral public key; ``ct``: nonce || ciphertext || tag."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    epk: str = Field(min_length=43, max_length=43)
    ct: str = Field(repr=False, max_length=4 * 1024 * 1024)


def _key(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + recipient,
                info=_INFO).derive(shared)


def seal(recipient_public_key: str, plaintext: bytes, aad: bytes) -> SealedBox:
    try:
        recipient = b64u_decode(recipient_public_key)
        peer = X25519PublicKey.from_public_bytes(recipient)
    except ValueError:
        raise Rejected(Reason.MALFORMED, "not an X25519 public key") from None
    eph = X25519PrivateKey.generate()
    epk = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    try:
        shared = eph.exchange(peer)
    except ValueError:  # low-order point: no secret key would come out of it
        raise Rejected(Reason.MALFORMED, "unusable X25519 public key") from None
    nonce = os.urandom(_NONCE)
    ct = AESGCM(_key(shared, epk, recipient)).encrypt(nonce, plaintext, aad)
    return SealedBox(epk=b64u(epk), ct=b64u(nonce + ct))


def unseal(identity: WorkerIdentity, box: SealedBox, aad: bytes) -> bytes:
    try:
        epk = b64u_decode(box.epk)
        blob = b64u_decode(box.ct)
        if len(blob) < _NONCE + _TAG:
            raise ValueError("truncated")
        shared = identity.exchange(epk)
        key = _key(shared, epk, b64u_decode(identity.seal_public_key))
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
    except (ValueError, InvalidTag):
        raise Rejected(Reason.SEALED_SECRET_INVALID) from None
