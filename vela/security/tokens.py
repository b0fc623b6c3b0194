"""Signed tokens: worker-bound build tokens and admin/API tokens.

Both are JWTs signed with EdDSA by the server's :class:`KeyRing`, told apart
by an explicit ``typ`` header *and* audience (RFC 8725 §3.11-3.12), so one
can never pass as the other; registration tokens (``vrt_...``) are opaque and
never parse as either. Time checks use the injected ``now``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

import jwt
import jwt.types
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vela.security._codec import b64u, b64u_decode, jws_compact, timestamp
from vela.security.errors import Reason, Rejected
from vela.security.keys import KeyRing, load_public_key

BUILD_TOKEN_TYPE = "vela-build+jwt"  # noqa: S105 - a JWT typ
BUILD_AUDIENCE = "vela:build"
API_TOKEN_TYPE = "vela-api+jwt"  # noqa: S105 - a JWT typ
API_AUDIENCE = "vela:api"
ALGORITHM = "EdDSA"
MAX_TOKEN_CHARS = 8192
DEFAULT_LEEWAY_S = 5.0
REGISTRATION_PREFIX = "vrt_"

_ID = r"^[A-Za-z0-9_-]{16,64}$"


class Confirmation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    jkt: str = Field(pattern=r"^[A-Za-z0-9_-]{43}$")


class _Claims(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    iss: str
    aud: str
    iat: int
    nbf: int
    exp: int
    jti: str = Field(pattern=_ID)


class BuildClaims(_Claims):
    """Claims of a build token: this build, on this worker, with this key."""

    sub: str = Field(pattern=r"^[1-9][0-9]{0,18}$")
    wkr: str = Field(min_length=1, max_length=253)
    cnf: Confirmation

    @property
    def build_id(self) -> int:
        return int(self.sub)


class ApiClaims(_Claims):
    """Claims of an admin/API token (used by the HTTP API and the local CLI)."""

    sub: str = Field(min_length=1, max_length=250)
    scp: list[str]


def new_jti() -> str:
    return b64u(os.urandom(16))


def _mint(ring: KeyRing, typ: str, claims: _Claims) -> str:
    header = {"alg": ALGORITHM, "kid": ring.active.kid, "typ": typ}
    return jws_compact(header, claims.model_dump(mode="json"), ring.active.sign)


def mint_build_token(ring: KeyRing, *, issuer: str, build_id: int, worker: str, jkt: str,
                     timeout_s: int, grace_s: int, now: datetime) -> tuple[str, BuildClaims]:
    """A token for ``build_id`` on ``worker`` (key thumbprint ``jkt``), valid for the
    build's timeout plus ``grace_s``. Record ``claims.jti`` on the build."""
    iat = int(timestamp(now))
    claims = BuildClaims(iss=issuer, aud=BUILD_AUDIENCE, sub=str(build_id), wkr=worker,
                         cnf=Confirmation(jkt=jkt), iat=iat, nbf=iat,
                         exp=iat + int(timeout_s) + int(grace_s), jti=new_jti())
    return _mint(ring, BUILD_TOKEN_TYPE, claims), claims


def mint_api_token(ring: KeyRing, *, issuer: str, subject: str, scopes: list[str],
                   ttl_s: int, now: datetime) -> tuple[str, ApiClaims]:
    iat = int(timestamp(now))
    claims = ApiClaims(iss=issuer, aud=API_AUDIENCE, sub=subject, scp=list(scopes), iat=iat,
                       nbf=iat, exp=iat + int(ttl_s), jti=new_jti())
    return _mint(ring, API_TOKEN_TYPE, claims), claims


def verify_build_token(token: object, *, keys: Mapping[str, str], issuer: str, now: datetime,
                       leeway_s: float = DEFAULT_LEEWAY_S) -> BuildClaims:
    """Claims of a valid build token, or :class:`Rejected`.

    ``keys`` is ``{kid: public key}``: ``KeyRing.verifying_keys(now)`` on the
    server, the pinned server keys on a worker. Whether the token may still
    act on its build is :func:`vela.security.authz.authorize_build_request`.
    """
    return _verify(token, typ=BUILD_TOKEN_TYPE, audience=BUILD_AUDIENCE, model=BuildClaims,
                   keys=keys, issuer=issuer, now=now, leeway_s=leeway_s)


def verify_api_token(token: object, *, keys: Mapping[str, str], issuer: str, now: datetime,
                     leeway_s: float = DEFAULT_LEEWAY_S) -> ApiClaims:
    return _verify(token, typ=API_TOKEN_TYPE, audience=API_AUDIENCE, model=ApiClaims,
                   keys=keys, issuer=issuer, now=now, leeway_s=leeway_s)


def read_jws_header(token: object) -> dict[str, Any]:
    """The unverified header of a compact JWS, or ``malformed``/``wrong_type``."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise Rejected(Reason.MALFORMED, "not a token string of sane size")
    if token.startswith(REGISTRATION_PREFIX):
        raise Rejected(Reason.WRONG_TYPE, "a registration token is not a signed token")
    if token.count(".") != 2:
        raise Rejected(Reason.MALFORMED, "not a compact JWS")
    try:  # one token, one spelling: no alternative encodings of the same signature
        for segment in token.split("."):
            b64u_decode(segment)
    except ValueError:
        raise Rejected(Reason.MALFORMED, "not canonical base64url") from None
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise Rejected(Reason.MALFORMED, "unreadable token header") from None
    if not isinstance(header, dict):
        raise Rejected(Reason.MALFORMED, "unreadable token header")
    return header


def decode_jws(token: str, public_key: str) -> dict[str, Any]:
    """The payload of ``token`` once its EdDSA signature verifies under ``public_key``.

    Raises ``bad_signature`` or ``malformed``; claims are checked by the caller.
    """
    key = load_public_key(public_key)
    # pyjwt checks the signature and the algorithm; time and audience checks
    # are ours, against the injected clock.
    options: jwt.types.Options = {
        "verify_signature": True, "require": [], "verify_exp": False, "verify_nbf": False,
        "verify_iat": False, "verify_aud": False, "verify_iss": False, "verify_sub": False,
        "verify_jti": False}
    try:
        payload = jwt.decode(token, key=key, algorithms=[ALGORITHM], options=options)
    except jwt.InvalidSignatureError:
        raise Rejected(Reason.BAD_SIGNATURE) from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise Rejected(Reason.MALFORMED, "unreadable token payload") from None
    if not isinstance(payload, dict):
        raise Rejected(Reason.MALFORMED, "unreadable token payload")
    return payload


_C = TypeVar("_C", bound=_Claims)


def _verify(token: object, *, typ: str, audience: str, model: type[_C],
            keys: Mapping[str, str], issuer: str, now: datetime, leeway_s: float) -> _C:
    header = read_jws_header(token)
    assert isinstance(token, str)
    if header.get("alg") != ALGORITHM:
        raise Rejected(Reason.ALG_NOT_ALLOWED)
    if header.get("typ") != typ:
        raise Rejected(Reason.WRONG_TYPE, f"expected a {typ} token")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise Rejected(Reason.UNKNOWN_KID)
    payload = decode_jws(token, keys[kid])
    try:
        claims = model.model_validate(payload)
    except ValidationError:
        raise Rejected(Reason.MALFORMED, "token claims do not match their schema") from None
    if claims.aud != audience:
        raise Rejected(Reason.WRONG_AUDIENCE)
    if claims.iss != issuer:
        raise Rejected(Reason.WRONG_ISSUER)
    t = timestamp(now)
    if t + leeway_s < claims.nbf or t + leeway_s < claims.iat:
        raise Rejected(Reason.NOT_YET_VALID)
    if t - leeway_s >= claims.exp:
        raise Rejected(Reason.EXPIRED)
    return claims

