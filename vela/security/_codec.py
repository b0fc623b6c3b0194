"""Encodings every signature in the security core relies on.

Signed data is always *canonical bytes*: a domain-separation prefix naming
what is signed, then sorted-key compact JSON. Two different kinds of signed
object can therefore never be mistaken for one another, and the same object
always serializes to the same bytes on server and worker.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    """Strict unpadded base64url: anything non-canonical raises ValueError."""
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ValueError("not base64url") from None
    if b64u(raw) != text:  # rejects stray trailing bits: one value, one encoding
        raise ValueError("non-canonical base64url")
    return raw


def sha256_b64u(data: bytes) -> str:
    return b64u(hashlib.sha256(data).digest())


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def canonical(domain: str, obj: Any) -> bytes:
    """``domain`` + newline + canonical JSON. A newline never occurs in a JWS input."""
    return domain.encode("ascii") + b"\n" + canonical_json(obj)


def jws_compact(header: dict[str, Any], payload: dict[str, Any],
                sign: Callable[[bytes], bytes]) -> str:
    """A compact JWS; ``sign`` keeps the private key inside its owner."""
    signing_input = f"{b64u(canonical_json(header))}.{b64u(canonical_json(payload))}"
    return f"{signing_input}.{b64u(sign(signing_input.encode('ascii')))}"


def timestamp(when: datetime) -> float:
    if when.tzinfo is None:
        raise ValueError("naive datetime; pass timezone-aware UTC times")
    return when.timestamp()


def from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
