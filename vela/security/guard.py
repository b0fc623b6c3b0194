"""The full check of a request made with a build token, in its one order.

token (signature, type, time) → proof of possession (bound key, fresh,
unreplayed, over the call's reports) → authorization of each report against the
build's current row. The proof comes before authorization so that a stolen token
alone learns nothing about the build's state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

from vela.domain import BuildStatus
from vela.security.authz import authorize_build_request
from vela.security.errors import Reason, Rejected
from vela.security.proof import ReplayCache, reports_hash, verify_proof
from vela.security.tokens import DEFAULT_LEEWAY_S, BuildClaims, verify_build_token

log = logging.getLogger(__name__)


class BuildRequestGuard:
    """Holds the replay cache; one per process that serves build-token requests."""

    def __init__(self, *, issuer: str, proof_max_age_s: float, started_at: datetime,
                 max_replay_entries: int = 100_000,
                 leeway_s: float = DEFAULT_LEEWAY_S) -> None:
        self.issuer = issuer
        self.leeway_s = leeway_s
        self.replay = ReplayCache(max_age_s=proof_max_age_s, started_at=started_at,
                                  max_entries=max_replay_entries, skew_s=leeway_s)

    def check(self, *, token: object, proof: object, reports: Sequence[tuple[str, object]],
              keys: Mapping[str, str], build_id: int, build_status: BuildStatus | str,
              build_worker: str | None, build_token_jti: str | None,
              worker_sign_key: str | None, now: datetime) -> BuildClaims:
        """Claims of the token if a call of ``(action, payload)`` reports, in the order
        sent, made with ``token`` and ``proof``, may proceed; :class:`Rejected` for the
        first check that fails: :meth:`verify`, then :func:`authorize_build_request` for
        each report.

        ``build_*`` come from the build row named by the request; ``worker_sign_key``
        is the registered key of ``build_worker`` (None if it has none).
        """
        if not isinstance(reports, list | tuple) or not reports:
            # Never a token alone: a proof covers one or more reports.
            raise Rejected(Reason.MALFORMED, "one or more (action, payload) reports")
        claims = self.verify(token=token, proof=proof, reports_digest=reports_hash(reports),
                             keys=keys, build_id=build_id, worker_sign_key=worker_sign_key,
                             now=now)
        authorize_all(claims, [action for action, _ in reports], build_id=build_id,
                      build_status=build_status, build_worker=build_worker,
                      build_token_jti=build_token_jti)
        return claims

    def verify(self, *, token: object, proof: object, reports_digest: str,
               keys: Mapping[str, str], build_id: int, worker_sign_key: str | None,
               now: datetime) -> BuildClaims:
        """The token and the call's proof, without the build's row: the claims if the
        token is the server's and current, and ``proof`` was made with it by the key it
        is bound to, fresh, unreplayed, over the reports that hash to ``reports_digest``
        (:func:`~vela.security.proof.reports_hash` of the call as it arrived). Whoever
        acts on the reports must still pass them through
        :func:`authorize_build_request` against the row (:func:`authorize_all`),
        ideally in the transaction that writes them.

        ``keys`` are the server's verifying keys; ``worker_sign_key`` the registered
        key of the worker the build runs on.
        """
        try:
            claims = verify_build_token(token, keys=keys, issuer=self.issuer, now=now,
                                        leeway_s=self.leeway_s)
            if claims.build_id != build_id:
                raise Rejected(Reason.WRONG_BUILD, f"token is for build {claims.build_id}")
            assert isinstance(token, str)
            verify_proof(proof, token=token, claims=claims,
                         worker_sign_key=worker_sign_key or "",
                         reports_digest=reports_digest, build_id=build_id,
                         cache=self.replay, now=now)
        except Rejected as e:
            _rejected(e, build_id)
            raise
        return claims


def authorize_all(claims: BuildClaims, actions: Sequence[object], *, build_id: int,
                  build_status: BuildStatus | str, build_worker: str | None,
                  build_token_jti: str | None) -> None:
    """:func:`authorize_build_request` for each action of verified requests, in order."""
    action: object = ""
    try:
        for action in actions:
            authorize_build_request(claims, str(action), build_id=build_id,
                                    build_status=build_status, build_worker=build_worker,
                                    build_token_jti=build_token_jti)
    except Rejected as e:
        _rejected(e, build_id, action)
        raise


def _rejected(e: Rejected, build_id: int, action: object = "") -> None:
    log.info("build request rejected", extra={
        "reason": e.reason.value, "build_id": build_id, "action": str(action)[:40]})
