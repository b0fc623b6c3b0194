"""The one rejection type of the security core, and its stable reason codes.

A reason code labels logs, the dashboard's rejection metric and tests alike,
so codes are never renamed. Messages carry the code and a hint, never token,
secret or key material.
"""

from __future__ import annotations

from enum import StrEnum

from vela.errors import VelaError


class Reason(StrEnum):
    # Any credential or signed object that does not even parse.
    MALFORMED = "malformed"
    # Token types are mutually exclusive (RFC 8725 §3.12).
    WRONG_TYPE = "wrong_type"
    # JWT checks.
    ALG_NOT_ALLOWED = "alg_not_allowed"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_ISSUER = "wrong_issuer"
    # Binding of a build token to its build and worker.
    WRONG_BUILD = "wrong_build"
    WRONG_WORKER = "wrong_worker"
    # Proof of possession.
    PROOF_MISSING = "proof_missing"
    PROOF_INVALID = "proof_invalid"
    PROOF_REPLAYED = "proof_replayed"
    PROOF_STALE = "proof_stale"
    PROOF_WRONG_ACTION = "proof_wrong_action"
    # Authorization.
    BUILD_ENDED = "build_ended"
    TOKEN_REVOKED = "token_revoked"  # noqa: S105 - a reason code
    FORBIDDEN_ACTION = "forbidden_action"
    # Onboarding.
    REGISTRATION_UNKNOWN = "registration_unknown"
    REGISTRATION_USED = "registration_used"
    REGISTRATION_EXPIRED = "registration_expired"
    REGISTRATION_MISMATCH = "registration_mismatch"
    WORKER_UNKNOWN = "worker_unknown"
    WORKER_DISABLED = "worker_disabled"
    WORKER_PROTOCOL_MISMATCH = "worker_protocol_mismatch"
    # Challenges.
    CHALLENGE_UNKNOWN = "challenge_unknown"
    CHALLENGE_REPLAYED = "challenge_replayed"
    CHALLENGE_STALE = "challenge_stale"
    CHALLENGE_MISMATCH = "challenge_mismatch"
    ANSWER_BAD_SIGNATURE = "answer_bad_signature"
    # Packages and pinned server keys.
    PACKAGE_TAMPERED = "package_tampered"
    PACKAGE_NOT_FOR_ME = "package_not_for_me"
    PACKAGE_UNKNOWN_SIGNER = "package_unknown_signer"
    PACKAGE_EXPIRED = "package_expired"
    SEALED_SECRET_INVALID = "sealed_secret_invalid"  # noqa: S105 - a reason code
    KEY_SET_UNTRUSTED = "key_set_untrusted"
    # Queue modes (vela/legacy): the classic shared WORKER_SECRET, and routes
    # served by the other kind of worker.
    WORKER_SECRET_INVALID = "worker_secret_invalid"  # noqa: S105 - a reason code
    ROUTE_MODE_MISMATCH = "route_mode_mismatch"


_HINTS: dict[Reason, str] = {
    Reason.MALFORMED: "the credential or message does not parse",
    Reason.WRONG_TYPE: "a credential of another type was offered here",
    Reason.ALG_NOT_ALLOWED: "only EdDSA-signed tokens are accepted",
    Reason.UNKNOWN_KID: "signed by a key this server does not hold (or no longer trusts)",
    Reason.BAD_SIGNATURE: "the signature does not verify",
    Reason.EXPIRED: "the token has expired",
    Reason.NOT_YET_VALID: "the token is not valid yet (check clock skew)",
    Reason.WRONG_AUDIENCE: "the token is meant for another audience",
    Reason.WRONG_ISSUER: "the token was issued by another server",
    Reason.WRONG_BUILD: "the credential belongs to another build",
    Reason.WRONG_WORKER: "the credential belongs to another worker",
    Reason.PROOF_MISSING: "every build-token request needs a proof of possession",
    Reason.PROOF_INVALID: "the proof of possession does not verify for this token and worker",
    Reason.PROOF_REPLAYED: "this proof was already used; sign a fresh one per request",
    Reason.PROOF_STALE: "the proof is outside the acceptance window; sign a fresh one",
    Reason.PROOF_WRONG_ACTION: "the proof was signed for other reports (actions or payloads)",
    Reason.BUILD_ENDED: "the build has ended; its token is dead",
    Reason.TOKEN_REVOKED: "the token was revoked (a build token: its build has moved on)",
    Reason.FORBIDDEN_ACTION: "a build token may only report on its own build",
    Reason.REGISTRATION_UNKNOWN: "no such registration token; mint one with "
                                 "`vela worker-token create`",
    Reason.REGISTRATION_USED: "the registration token was already used; mint a new one",
    Reason.REGISTRATION_EXPIRED: "the registration token has expired; mint a new one",
    Reason.REGISTRATION_MISMATCH: "the registration does not match what the token or "
                                  "the registered worker allows",
    Reason.WORKER_UNKNOWN: "no worker of that name is registered; register with a token",
    Reason.WORKER_DISABLED: "the worker was deactivated by an admin",
    Reason.WORKER_PROTOCOL_MISMATCH: "the worker and the server are different vela versions "
                                     "that cannot work together: install the same vela "
                                     "version on the server and its workers",
    Reason.CHALLENGE_UNKNOWN: "no such outstanding challenge",
    Reason.CHALLENGE_REPLAYED: "the challenge was already answered",
    Reason.CHALLENGE_STALE: "the challenge is too old; ask for a new one",
    Reason.CHALLENGE_MISMATCH: "the answer is for another challenge",
    Reason.ANSWER_BAD_SIGNATURE: "the answer is not signed by the worker's registered key",
    Reason.PACKAGE_TAMPERED: "the package signature does not verify",
    Reason.PACKAGE_NOT_FOR_ME: "the package is addressed to another worker",
    Reason.PACKAGE_UNKNOWN_SIGNER: "the package is signed by a key this worker has not pinned",
    Reason.PACKAGE_EXPIRED: "the package has expired",
    Reason.SEALED_SECRET_INVALID: "the sealed secrets do not decrypt for this worker",
    Reason.KEY_SET_UNTRUSTED: "the server key set is not endorsed by a pinned key",
    Reason.WORKER_SECRET_INVALID: "not the server's legacy worker secret "
                                  "(server.worker_secret / worker.worker_secret)",
    Reason.ROUTE_MODE_MISMATCH: "the route is served in the other queue mode on this server: "
                                "legacy workers serve queue.legacy_routes (every route with "
                                "queue.mode = \"legacy\"), queueless workers the others",
}

# Refusals of a request's proof of possession rather than of its token or build: the
# proof aged or was spent before it could be checked (a verifier restarted between
# signing and checking, a write failed after the check). The same request with a fresh
# proof may pass; the worker signs one and sends it again.
PROOF_ONLY = frozenset({Reason.PROOF_STALE, Reason.PROOF_REPLAYED})


class Rejected(VelaError):
    """A credential, proof, challenge answer or package was refused.

    ``reason`` is a :class:`Reason`; ``detail`` is code-written context (ids,
    names), never material from the rejected input.
    """

    def __init__(self, reason: Reason | str, detail: str = "") -> None:
        self.reason = Reason(reason)
        self.detail = detail
        hint = _HINTS[self.reason]
        super().__init__(f"{self.reason}: {hint}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Crosses Ray process boundaries intact (the default would lose ``reason``).
        return (type(self), (self.reason, self.detail))

    def __repr__(self) -> str:
        return f"Rejected({self.reason.value!r})"
