"""AES-256-GCM for data at rest (secret values, server private keys)."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vela.errors import VelaError

NONCE_BYTES = 12


class DecryptionFailed(VelaError):
    """Ciphertext did not authenticate: wrong key, wrong context, or tampered."""


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || ciphertext+tag. ``aad`` binds the value to where it is stored."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise DecryptionFailed(
            "stored value does not decrypt: wrong master key or tampered data"
        ) from None
