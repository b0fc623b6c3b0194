"""Queue items: what they carry, how they are signed, how they are checked.

An item carries references only (never secrets or the pipeline), so a reader
of the queue learns little and a writer to the queue can do little: without
the server's Ed25519 queue key it cannot forge an item the listener accepts.

Wire format, compact UTF-8 JSON::

    {"item": {"attempt": 1, "build_id": 7, "enqueued_at": 1700000000.5,
              "route": "vela", "v": 1},
     "kid": "q1", "sig": "<base64url, no padding>"}

``sig`` is Ed25519 over ``SIGNING_CONTEXT + canonical(item)``, where
canonical JSON has sorted keys, no spaces and no NaN/Infinity. The verifier
re-derives the canonical bytes from the parsed ``item`` object, so what is
checked is exactly what is used.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from vela.errors import VelaError

if TYPE_CHECKING:
    from vela.security.keys import SigningKey

# Domain separation: a signature made for a queue item is useless anywhere else.
SIGNING_CONTEXT = b"vela/queue-item/v1\n"
SIGNATURE_BYTES = 64


class InvalidReason(StrEnum):
    """Stable codes for items the listener refuses; used by logs, metrics and tests."""

    MALFORMED = "malformed"            # not JSON, or not the item schema
    TOO_LARGE = "too_large"            # over queue.max_item_bytes
    UNKNOWN_ROUTE = "unknown_route"    # the signed route is not configured
    ROUTE_MISMATCH = "route_mismatch"  # signed for another route than the queue it sat on
    UNSIGNED = "unsigned"              # no signature or key id
    BAD_SIGNATURE = "bad_signature"    # signature does not verify (tampered or forged)
    UNKNOWN_KID = "unknown_kid"        # signed with a key this server does not trust


class QueueItemInvalid(VelaError):
    """A queue item was refused; ``reason`` is an :class:`InvalidReason` code.

    ``claimed_build_id``: the build an item refused for its signature alone says it is
    for — unproven, so good only for what is harmless whoever asks it: queueing that
    build again if it is still pending (an item its key no longer verifies, or one
    tampered with, must not leave its build pending for ever)."""

    def __init__(self, reason: InvalidReason, message: str,
                 claimed_build_id: int | None = None) -> None:
        super().__init__(f"queue item refused ({reason}): {message}")
        self.reason = reason
        self.detail = message
        self.claimed_build_id = claimed_build_id

    def __reduce__(self) -> tuple[type[QueueItemInvalid], tuple[InvalidReason, str, int | None]]:
        return type(self), (self.reason, self.detail, self.claimed_build_id)


# The largest build id a database holds (a 64-bit signed integer): a larger one cannot
# be looked up (the database refuses the query).
MAX_BUILD_ID = 2**63 - 1


def _claimed_build_id(body: object) -> int | None:
    build_id = body.get("build_id") if isinstance(body, dict) else None
    if type(build_id) is int and 0 < build_id <= MAX_BUILD_ID:
        return build_id
    return None


class QueueItem(BaseModel):
    """A reference to a pending build; the build itself lives in the database."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    build_id: StrictInt = Field(gt=0)
    route: str = Field(min_length=1, max_length=250)
    enqueued_at: float
    # 1 for the first enqueue; the server bumps it when it enqueues a build again.
    attempt: StrictInt = Field(default=1, ge=1)

    @classmethod
    def new(cls, build_id: int, route: str, *, attempt: int = 1,
            now: float | None = None) -> QueueItem:
        return cls(build_id=build_id, route=route, attempt=attempt,
                   enqueued_at=time.time() if now is None else now)


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


class _Signs(Protocol):
    def sign(self, data: bytes) -> bytes: ...


class ItemSigner:
    """Signs items with the server's queue key."""

    def __init__(self, private_key: Ed25519PrivateKey | _Signs, kid: str) -> None:
        if not kid:
            raise ValueError("a signing key needs a key id")
        self._key = private_key
        self.kid = kid

    @classmethod
    def from_key(cls, key: SigningKey) -> ItemSigner:
        """Signs with a server :class:`~vela.security.keys.SigningKey` (purpose ``queue``)."""
        return cls(key, key.kid)

    def sign(self, item: QueueItem) -> bytes:
        body = item.model_dump(mode="json")
        sig = self._key.sign(SIGNING_CONTEXT + canonical_json(body))
        return canonical_json({"item": body, "kid": self.kid, "sig": _b64url(sig)})


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


class ItemVerifier:
    """Checks raw queue payloads; raises :class:`QueueItemInvalid` with a reason."""

    @classmethod
    def from_public_keys(cls, keys: Mapping[str, str], known_routes: Iterable[str],
                         max_bytes: int) -> ItemVerifier:
        """From ``{kid: base64url public key}``, as ``KeyRing.verifying_keys`` gives them."""
        verifier = cls({}, known_routes, max_bytes)
        verifier.use_keys(keys)
        return verifier

    def __init__(self, public_keys: Mapping[str, Ed25519PublicKey], known_routes: Iterable[str],
                 max_bytes: int) -> None:
        self._keys = dict(public_keys)
        self._given: dict[str, str] | None = None  # what use_keys last loaded them from
        # Keeps configuration order: the listener walks routes in this order.
        self.known_routes: tuple[str, ...] = tuple(dict.fromkeys(known_routes))
        self.max_bytes = max_bytes

    def use_keys(self, keys: Mapping[str, str]) -> None:
        """Trust exactly ``keys`` (``{kid: base64url public key}``) from now on: the
        server's verifying queue keys as they are after a rotation."""
        if keys == self._given:
            return
        from vela.security.keys import load_public_key

        self._keys = {kid: load_public_key(k) for kid, k in keys.items()}
        self._given = dict(keys)

    def trust(self, kid: str, key: Ed25519PublicKey) -> None:
        """Add a key (rotation: trust the new key before the signer switches to it)."""
        self._keys[kid] = key
        self._given = None

    def distrust(self, kid: str) -> None:
        self._keys.pop(kid, None)
        self._given = None

    def verify(self, raw: bytes, *, route: str) -> QueueItem:
        """The item in ``raw``, taken from the queue of ``route``."""
        if len(raw) > self.max_bytes:
            raise QueueItemInvalid(InvalidReason.TOO_LARGE,
                                   f"{len(raw)} bytes, the limit is {self.max_bytes}")
        try:
            envelope = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise QueueItemInvalid(InvalidReason.MALFORMED, f"not JSON: {e}") from None
        if not isinstance(envelope, dict):
            raise QueueItemInvalid(InvalidReason.MALFORMED, "not a JSON object")
        sig, kid = envelope.get("sig"), envelope.get("kid")
        body = envelope.get("item")
        if sig is None or kid is None:
            raise QueueItemInvalid(InvalidReason.UNSIGNED, "no signature or key id",
                                   _claimed_build_id(body))
        if not isinstance(body, dict) or set(envelope) != {"item", "kid", "sig"}:
            raise QueueItemInvalid(InvalidReason.MALFORMED,
                                   "expected exactly the fields item, kid and sig")
        if not isinstance(kid, str) or not isinstance(sig, str):
            raise QueueItemInvalid(InvalidReason.MALFORMED, "kid and sig must be strings")
        key = self._keys.get(kid)
        if key is None:
            raise QueueItemInvalid(InvalidReason.UNKNOWN_KID, f"key id {kid[:64]!r} is not trusted",
                                   _claimed_build_id(body))
        try:
            signature = _unb64url(sig)
        except (binascii.Error, ValueError):
            signature = b""
        if len(signature) != SIGNATURE_BYTES:
            raise QueueItemInvalid(InvalidReason.BAD_SIGNATURE, "signature is not 64 bytes",
                                   _claimed_build_id(body))
        try:
            # 1e400 (inf) or a lone surrogate cannot be signed bytes: no key made them.
            signed = canonical_json(body)
        except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
            raise QueueItemInvalid(InvalidReason.MALFORMED, "not signable JSON") from None
        try:
            key.verify(signature, SIGNING_CONTEXT + signed)
        except InvalidSignature:
            raise QueueItemInvalid(InvalidReason.BAD_SIGNATURE,
                                   "signature does not match the item",
                                   _claimed_build_id(body)) from None
        try:
            item = QueueItem.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise QueueItemInvalid(InvalidReason.MALFORMED, f"{where}: {first['msg']}") from None
        if item.route not in self.known_routes:
            raise QueueItemInvalid(InvalidReason.UNKNOWN_ROUTE,
                                   f"route {item.route!r} is not configured")
        if item.route != route:
            raise QueueItemInvalid(InvalidReason.ROUTE_MISMATCH,
                                   f"signed for route {item.route!r}, found on {route!r}")
        return item


def peek(raw: bytes) -> dict[str, Any] | None:
    """The item fields of a payload, unverified: for display only, never for decisions."""
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(envelope, dict):
        body = envelope.get("item", envelope)
        if isinstance(body, dict):
            return body
    return None
