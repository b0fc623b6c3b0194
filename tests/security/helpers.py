"""Forging helpers for adversarial tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from vela.security._codec import b64u, jws_compact
from vela.security.tokens import BUILD_AUDIENCE, BUILD_TOKEN_TYPE

from .conftest import ISSUER


def build_claims(now_ts: int, **over):
    claims = {"iss": ISSUER, "aud": BUILD_AUDIENCE, "sub": "7", "wkr": "a",
              "cnf": {"jkt": "A" * 43}, "iat": now_ts, "nbf": now_ts, "exp": now_ts + 600,
              "jti": "j" * 22}
    claims.update(over)
    return claims


def forge(ring, claims, **header_over):
    """A token signed by ``ring`` with any header and claims."""
    header = {"alg": "EdDSA", "kid": ring.active.kid, "typ": BUILD_TOKEN_TYPE, **header_over}
    header = {k: v for k, v in header.items() if v is not None}  # None drops a field
    return jws_compact(header, claims, ring.active.sign)


def unsigned(header, claims, sig=b""):
    part = lambda d: b64u(json.dumps(d).encode())  # noqa: E731
    return f"{part(header)}.{part(claims)}.{b64u(sig)}"


def hs256(header, claims, secret: bytes):
    part = lambda d: b64u(json.dumps(d).encode())  # noqa: E731
    signing_input = f"{part(header)}.{part(claims)}".encode()
    return signing_input.decode() + "." + b64u(hmac.new(secret, signing_input,
                                                        hashlib.sha256).digest())


def b64std(data: bytes) -> str:
    return base64.b64encode(data).decode()
