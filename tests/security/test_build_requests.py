"""Requests made with a build token: proof of possession, replay, and authorization."""

from __future__ import annotations

from datetime import timedelta

import pytest

from vela.domain import BuildStatus
from vela.security import (
    BuildRequestGuard,
    Reason,
    Rejected,
    ReplayCache,
    authorize_build_request,
    mint_build_token,
)
from vela.security._codec import jws_compact

from .conftest import ISSUER


def rejected(reason, fn, *args, **kwargs):
    with pytest.raises(Rejected) as e:
        fn(*args, **kwargs)
    assert e.value.reason is reason, e.value
    return e.value


def test_happy_path_every_allowed_action(running, clock):
    for action in ("build.start", "step.update", "log.append", "build.finish"):
        claims = running.check(clock, proof=running.proof(clock, action=action), action=action)
        assert claims.build_id == 7 and claims.wkr == "a"


def test_one_proof_covers_a_call_of_several_reports(running, clock, worker_b):
    """A call's reports share the token's check and one fresh proof, made by the bound
    key over all of them — actions and payloads, in order — for its build; change any
    of them after signing and the proof no longer fits."""
    reports = [("log.append", {"number": 1, "lines": ["a"]}),
               ("step.update", {"number": 1, "status": "success"}),
               ("build.finish", {"status": "success"})]
    claims = running.check_all(clock, proof=running.proof(clock, reports=reports),
                               reports=reports)
    assert claims.wkr == "a"
    tampered = {
        "payload changed": [*reports[:2], ("build.finish", {"status": "failure"})],
        "action changed": [*reports[:2], ("step.update", {"status": "success"})],
        "reordered": [reports[1], reports[0], reports[2]],
        "one dropped": reports[:2],
        "one added": [*reports, ("log.append", {"number": 1, "lines": ["b"]})],
        "log line injected": [("log.append", {"number": 1, "lines": ["a", "b"]}),
                              *reports[1:]],
    }
    for sent in tampered.values():
        rejected(Reason.PROOF_WRONG_ACTION, running.check_all, clock,
                 proof=running.proof(clock, reports=reports), reports=sent)
    proof = running.proof(clock, reports=reports)
    running.check_all(clock, proof=proof, reports=reports)
    for proof, reason in [
        (proof, Reason.PROOF_REPLAYED),
        (running.proof(clock, reports=reports, identity=worker_b), Reason.PROOF_INVALID),
        (running.proof(clock, reports=reports, build_id=8), Reason.WRONG_BUILD),
    ]:
        rejected(reason, running.check_all, clock, proof=proof, reports=reports)
    for reports_sent in ([], "log.append", [("log.append",)], [("log.append", {1, 2})]):
        rejected(Reason.MALFORMED, running.check_all, clock, proof=running.proof(clock),
                 reports=reports_sent)
    forged = running.token[:-4] + ("AAAA" if not running.token.endswith("AAAA") else "BBBB")
    rejected(Reason.BAD_SIGNATURE, running.check_all, clock, token=forged,
             proof=running.proof(clock, reports=reports), reports=reports)


def test_no_proof_rejected(running, clock):
    rejected(Reason.PROOF_MISSING, running.check, clock, proof=None)
    rejected(Reason.PROOF_MISSING, running.check, clock, proof="")


def test_replayed_proof_rejected(running, clock):
    proof = running.proof(clock)
    running.check(clock, proof=proof)
    clock.advance(1)
    rejected(Reason.PROOF_REPLAYED, running.check, clock, proof=proof)


def test_proof_for_another_action_or_payload_rejected(running, clock):
    proof = running.proof(clock, action="log.append")
    rejected(Reason.PROOF_WRONG_ACTION, running.check, clock, proof=proof, action="build.finish")
    proof = running.proof(clock, action="build.finish", payload={"status": "failure"})
    rejected(Reason.PROOF_WRONG_ACTION, running.check, clock, proof=proof,
             action="build.finish", payload={"status": "success"})


def test_stale_proof_rejected(running, clock):
    proof = running.proof(clock)
    clock.advance(31)
    rejected(Reason.PROOF_STALE, running.check, clock, proof=proof)


def test_proof_from_the_future_rejected(running, clock):
    proof = running.proof(clock)
    clock.advance(-6)
    rejected(Reason.PROOF_STALE, running.check, clock, proof=proof)


def test_proof_captured_before_a_restart_rejected(running, clock):
    """After a restart the replay cache is empty: the start time guards instead."""
    proof = running.proof(clock)
    running.check(clock, proof=proof)
    clock.advance(1)
    running.guard = BuildRequestGuard(issuer=ISSUER, proof_max_age_s=30, started_at=clock.now)
    rejected(Reason.PROOF_STALE, running.check, clock, proof=proof)
    clock.advance(0.01)
    running.check(clock, proof=running.proof(clock))


def test_worker_a_token_with_worker_b_proof_rejected(running, clock, worker_b):
    proof = running.proof(clock, identity=worker_b)
    rejected(Reason.PROOF_INVALID, running.check, clock, proof=proof)


def test_token_whose_worker_was_rekeyed_rejected(running, clock, worker_b):
    running.registered["a"] = worker_b.sign_public_key
    proof = running.proof(clock, identity=worker_b)
    rejected(Reason.WRONG_WORKER, running.check, clock, proof=proof)


def test_proof_for_another_token_rejected(running, clock, worker_a):
    other, _ = mint_build_token(running.ring, issuer=ISSUER, build_id=7, worker="a",
                                jkt=worker_a.thumbprint, timeout_s=60, grace_s=0,
                                now=clock.now)
    rejected(Reason.PROOF_INVALID, running.check, clock, proof=running.proof(clock, token=other))


def test_proof_not_signed_with_eddsa_rejected(running, clock):
    good = running.proof(clock)
    h, p, s = good.split(".")
    from vela.security._codec import b64u
    none_alg = b64u(b'{"alg":"none","typ":"vela-proof+jwt"}')
    rejected(Reason.PROOF_INVALID, running.check, clock, proof=f"{none_alg}.{p}.")
    rejected(Reason.PROOF_INVALID, running.check, clock, proof=f"{h}.{p}.{s[:-4]}AAAA")
    rejected(Reason.PROOF_INVALID, running.check, clock, proof="not-a-proof")
    # A build token is not a proof, even though it is a valid EdDSA JWS.
    rejected(Reason.PROOF_INVALID, running.check, clock, proof=running.token)


def test_proof_with_malformed_claims_rejected(running, clock, worker_a):
    bad = jws_compact({"alg": "EdDSA", "typ": "vela-proof+jwt"},
                      {"ath": "x", "rqh": "step.update", "bid": 7, "iat": 1, "jti": "j"},
                      worker_a.sign)
    rejected(Reason.PROOF_INVALID, running.check, clock, proof=bad)


@pytest.mark.parametrize("iat", ["NaN", "Infinity", "-Infinity"])
def test_proof_with_a_time_that_is_not_a_number_rejected(running, clock, worker_a, iat):
    """JSON parsers take NaN, and NaN compares as neither too old nor too new: a proof
    naming it, signed by the bound key, would be fresh forever."""
    import json

    from vela.security._codec import b64u
    from vela.security.proof import reports_hash, token_hash
    reports = [("step.update", {})]
    claims = {"ath": token_hash(running.token), "rqh": reports_hash(reports), "bid": 7,
              "iat": float(iat), "jti": "a" * 22}
    signing_input = ".".join(b64u(json.dumps(part, sort_keys=True).encode()) for part in
                             ({"alg": "EdDSA", "typ": "vela-proof+jwt"}, claims))
    assert f'"iat": {iat}' in json.dumps(claims)  # what a worker could send
    proof = f"{signing_input}.{b64u(worker_a.sign(signing_input.encode()))}"
    rejected(Reason.PROOF_INVALID, running.check_all, clock, proof=proof, reports=reports)
    clock.advance(300)
    rejected(Reason.PROOF_INVALID, running.check_all, clock, proof=proof, reports=reports)


def test_replay_cache_refuses_a_time_that_is_not_a_number(clock):
    cache = ReplayCache(max_age_s=30, started_at=clock.now - timedelta(seconds=1))
    for iat in (float("nan"), float("inf"), float("-inf")):
        rejected(Reason.PROOF_STALE, cache.admit, f"k{iat}", iat, clock.now)
    assert len(cache) == 0


def test_build_a_token_on_build_b_rejected(running, clock):
    # A proof naming build B is refused by authorization ...
    rejected(Reason.WRONG_BUILD, running.check, clock, proof=running.proof(clock, build_id=8),
             build_id=8)
    # ... and a proof naming build A is refused on a request for B.
    rejected(Reason.WRONG_BUILD, running.check, clock, proof=running.proof(clock), build_id=8)


def test_token_after_build_ended_rejected(running, clock):
    for status in ("success", "failure", "error", "killed", "canceled"):
        rejected(Reason.BUILD_ENDED, running.check, clock, proof=running.proof(clock),
                 status=BuildStatus(status))
        clock.advance(0.01)


def test_token_after_redispatch_rejected(running, clock):
    rejected(Reason.TOKEN_REVOKED, running.check, clock, proof=running.proof(clock),
             jti="another-token-id-000")
    clock.advance(0.01)
    rejected(Reason.TOKEN_REVOKED, running.check, clock, proof=running.proof(clock),
             status=BuildStatus.PENDING)


def test_token_on_build_moved_to_another_worker_rejected(running, clock):
    # The build row now names worker b; a's token and a's proof no longer fit.
    rejected(Reason.WRONG_WORKER, running.check, clock, proof=running.proof(clock), worker="b")


@pytest.mark.parametrize("action", ["secret.read", "secret.list", "build.create",
                                    "worker.register", "registration.create", "", "BUILD.START"])
def test_build_token_cannot_do_anything_else(running, clock, action):
    rejected(Reason.FORBIDDEN_ACTION, running.check, clock,
             proof=running.proof(clock, action=action), action=action)


def test_authorize_is_the_single_decision(running, clock):
    from vela.security import verify_build_token
    claims = verify_build_token(running.token, keys=running.ring.verifying_keys(clock.now),
                                issuer=ISSUER, now=clock.now)
    ok = dict(build_id=7, build_status="running", build_worker="a", build_token_jti=claims.jti)
    authorize_build_request(claims, "log.append", **ok)
    rejected(Reason.TOKEN_REVOKED, authorize_build_request, claims, "log.append",
             **{**ok, "build_token_jti": None})
    rejected(Reason.WRONG_WORKER, authorize_build_request, claims, "log.append",
             **{**ok, "build_worker": None})


def test_replay_cache_is_bounded_and_fails_closed(clock):
    cache = ReplayCache(max_age_s=30, started_at=clock.now, max_entries=3)
    base = clock.now.timestamp()
    clock.advance(10)
    for i in range(1, 6):
        cache.admit(f"k{i}", base + i, clock.now)
    assert len(cache) == 3
    # k1 and k2 were forgotten: replaying them is refused as stale, not accepted.
    rejected(Reason.PROOF_STALE, cache.admit, "k1", base + 1, clock.now)
    rejected(Reason.PROOF_STALE, cache.admit, "k2", base + 2, clock.now)
    rejected(Reason.PROOF_REPLAYED, cache.admit, "k5", base + 5, clock.now)
    # Entries past max age are dropped for free.
    clock.advance(60)
    cache.admit("k9", clock.now.timestamp(), clock.now)
    assert len(cache) == 1


def test_same_proof_id_from_two_workers_does_not_collide(clock, ring, worker_a, worker_b):
    """The cache key includes the key thumbprint: one worker cannot burn another's ids."""
    cache = ReplayCache(max_age_s=30, started_at=clock.now - timedelta(seconds=1))
    cache.admit(f"{worker_a.thumbprint}:same", clock.now.timestamp(), clock.now)
    cache.admit(f"{worker_b.thumbprint}:same", clock.now.timestamp(), clock.now)
