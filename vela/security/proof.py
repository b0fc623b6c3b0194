"""Proof of possession for build-token requests (DPoP-like, RFC 9449 in spirit).

Every call made with a build token carries a fresh proof: a small JWS by the
worker's Ed25519 key over the token's hash (``ath``), the hash of the call's
reports — their actions and payloads, in order (``rqh``) —, the build (``bid``),
the time (``iat``) and a never-repeated value (``jti``). A copied token without
the worker's key is useless; a copied proof is good for its one call only,
within ``max_age_s``, and no report of that call can be changed, dropped,
added or reordered under it.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vela.security._codec import b64u, canonical_json, jws_compact, sha256_b64u, timestamp
from vela.security.errors import Reason, Rejected
from vela.security.keys import jwk_thumbprint, same
from vela.security.tokens import ALGORITHM, BuildClaims, decode_jws, read_jws_header

if TYPE_CHECKING:
    from vela.security.identity import WorkerIdentity

PROOF_TYPE = "vela-proof+jwt"
DEFAULT_SKEW_S = 5.0


class ProofClaims(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    ath: str = Field(pattern=r"^[A-Za-z0-9_-]{43}$")
    rqh: str = Field(pattern=r"^[A-Za-z0-9_-]{43}$")
    bid: int
    iat: float = Field(allow_inf_nan=False)  # NaN would compare as never stale
    jti: str = Field(pattern=r"^[A-Za-z0-9_-]{16,64}$")


def token_hash(token: str) -> str:
    return sha256_b64u(token.encode("ascii", "replace"))


def reports_hash(reports: Sequence[tuple[str, object]]) -> str:
    """What a proof signs of its call: the hash of its ``(action, payload)`` reports, in
    order, as canonical JSON; ``malformed`` if they are not plain JSON."""
    try:
        return sha256_b64u(canonical_json([[str(action), payload]
                                           for action, payload in reports]))
    except (TypeError, ValueError):
        raise Rejected(Reason.MALFORMED, "reports that are not plain JSON") from None


def make_proof(identity: WorkerIdentity, *, token: str,
               reports: Sequence[tuple[str, object]], build_id: int, now: datetime) -> str:
    """Worker side: a proof for one call of ``(action, payload)`` reports on
    ``build_id``, sent in this order (never reuse it)."""
    claims = ProofClaims(ath=token_hash(token), rqh=reports_hash(reports), bid=build_id,
                         iat=round(timestamp(now), 3), jti=b64u(os.urandom(16)))
    return jws_compact({"alg": ALGORITHM, "typ": PROOF_TYPE}, claims.model_dump(),
                       identity.sign)


class ReplayCache:
    """Proof ids seen within the acceptance window, in bounded memory.

    A proof is accepted only if issued after ``floor``, at most ``max_age_s``
    ago (and not more than ``skew_s`` ahead), and never seen before. ``floor``
    starts at the verifier's start, so an empty cache after a restart cannot
    be fooled by proofs captured before it. When full, the oldest entry is
    forgotten and ``floor`` moves up past it: memory stays bounded and a
    forgotten proof is still refused (as stale) rather than replayable.
    """

    def __init__(self, *, max_age_s: float, started_at: datetime, max_entries: int = 100_000,
                 skew_s: float = DEFAULT_SKEW_S) -> None:
        self.max_age_s = max_age_s
        self.skew_s = skew_s
        self.max_entries = max_entries
        self.floor = timestamp(started_at)
        self._seen: set[str] = set()
        self._by_age: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, key: str, iat: float, now: datetime) -> None:
        t = timestamp(now)
        while self._by_age and self._by_age[0][0] < t - self.max_age_s:
            self._seen.discard(heapq.heappop(self._by_age)[1])
        if (not math.isfinite(iat) or iat <= self.floor or iat < t - self.max_age_s
                or iat > t + self.skew_s):
            raise Rejected(Reason.PROOF_STALE)
        if key in self._seen:
            raise Rejected(Reason.PROOF_REPLAYED)
        while len(self._seen) >= self.max_entries:
            oldest, old_key = heapq.heappop(self._by_age)
            self._seen.discard(old_key)
            self.floor = max(self.floor, oldest)
        if iat <= self.floor:
            raise Rejected(Reason.PROOF_STALE)
        self._seen.add(key)
        heapq.heappush(self._by_age, (iat, key))


def verify_proof(proof: object, *, token: str, claims: BuildClaims, worker_sign_key: str,
                 reports_digest: str, build_id: int, cache: ReplayCache,
                 now: datetime) -> ProofClaims:
    """Check ``proof`` for a call made with ``token`` (already verified to ``claims``)
    whose reports hash to ``reports_digest`` (:func:`reports_hash` of what arrived).

    ``worker_sign_key`` is the registered key of the worker the build runs on;
    it must be the key the token is bound to (``cnf.jkt``).
    """
    if proof is None or proof == "":
        raise Rejected(Reason.PROOF_MISSING)
    try:
        header = read_jws_header(proof)
    except Rejected:
        raise Rejected(Reason.PROOF_INVALID, "unreadable proof") from None
    if header.get("alg") != ALGORITHM or header.get("typ") != PROOF_TYPE:
        raise Rejected(Reason.PROOF_INVALID, "not a proof of possession")
    try:
        bound = same(jwk_thumbprint(worker_sign_key), claims.cnf.jkt)
    except Rejected:
        bound = False
    if not bound:
        raise Rejected(Reason.WRONG_WORKER, f"token is not bound to the key of {claims.wkr}")
    assert isinstance(proof, str)
    body = _decode(proof, worker_sign_key)
    if not same(body.ath, token_hash(token)):
        raise Rejected(Reason.PROOF_INVALID, "proof is for another token")
    if body.bid != build_id:
        raise Rejected(Reason.WRONG_BUILD, "proof is for another build")
    if not same(body.rqh, reports_digest):
        raise Rejected(Reason.PROOF_WRONG_ACTION)
    cache.admit(f"{claims.cnf.jkt}:{body.jti}", body.iat, now)
    return body


def _decode(proof: str, key: str) -> ProofClaims:
    try:
        return ProofClaims.model_validate(decode_jws(proof, key))
    except (Rejected, ValidationError):
        raise Rejected(Reason.PROOF_INVALID) from None
