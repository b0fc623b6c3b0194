"""Random input into every verifier raises only Rejected (never a crash, never a pass)."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from vela.security import (
    BuildRequestGuard,
    KeyRing,
    Rejected,
    WorkerIdentity,
    hash_registration_token,
    mint_build_token,
    open_package,
    pin_key_set,
    reports_hash,
    seal_package,
    verify_api_token,
    verify_build_token,
    verify_proof,
)
from vela.security.proof import ReplayCache

from .conftest import ISSUER, START

RING = KeyRing.generate(START)
KEYS = RING.verifying_keys(START)
WORKER = WorkerIdentity.generate()
TOKEN, CLAIMS = mint_build_token(RING, issuer=ISSUER, build_id=7, worker="a",
                                 jkt=WORKER.thumbprint, timeout_s=600, grace_s=0, now=START)
PACKAGE = seal_package(ring=RING, server_id=ISSUER, build_id=7, worker="a",
                       worker_seal_key=WORKER.seal_public_key, build={"n": 1}, executable="{}",
                       secrets={"k": "v"}, build_token=TOKEN, now=START, ttl_s=60).to_wire()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
garbage = st.text(max_size=300) | st.binary(max_size=300) | json_values
jws_like = st.lists(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=",
                            max_size=120), min_size=3, max_size=3).map(".".join)


def only_rejected(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Rejected:
        pass
    else:
        raise AssertionError("random input was accepted")


def mutate(text: str, data) -> str:
    i = data.draw(st.integers(0, len(text) - 1))
    c = data.draw(st.sampled_from("ABCabc012-_.=+/ "))
    if c == text[i]:
        c = "Z" if c != "Z" else "Y"
    return text[:i] + c + text[i + 1:]


@settings(max_examples=150, deadline=None)
@given(token=garbage | jws_like)
def test_token_verifiers(token):
    only_rejected(verify_build_token, token, keys=KEYS, issuer=ISSUER, now=START)
    only_rejected(verify_api_token, token, keys=KEYS, issuer=ISSUER, now=START)
    only_rejected(hash_registration_token, token)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_mutated_token_rejected(data):
    only_rejected(verify_build_token, mutate(TOKEN, data), keys=KEYS, issuer=ISSUER, now=START)


@settings(max_examples=150, deadline=None)
@given(proof=garbage | jws_like)
def test_proof_verifier(proof):
    cache = ReplayCache(max_age_s=30, started_at=START - timedelta(seconds=1))
    only_rejected(verify_proof, proof, token=TOKEN, claims=CLAIMS,
                  worker_sign_key=WORKER.sign_public_key,
                  reports_digest=reports_hash([("log.append", {})]), build_id=7,
                  cache=cache, now=START)


@settings(max_examples=100, deadline=None)
@given(token=garbage | jws_like, proof=garbage | jws_like, action=st.text(max_size=20),
       payload=garbage, shape=st.sampled_from(["one", "garbage", "empty"]), junk=garbage)
def test_guard(token, proof, action, payload, shape, junk):
    guard = BuildRequestGuard(issuer=ISSUER, proof_max_age_s=30, started_at=START)
    reports = {"one": [(action, payload)], "garbage": junk, "empty": []}[shape]
    only_rejected(guard.check, token=token, proof=proof, reports=reports, keys=KEYS,
                  build_id=7, build_status="running", build_worker="a",
                  build_token_jti=CLAIMS.jti, worker_sign_key=WORKER.sign_public_key,
                  now=START)
    # The real token without a report, or with reports that are not (action, payload):
    only_rejected(guard.check, token=TOKEN, proof=proof,
                  reports=[] if shape == "empty" else [junk], keys=KEYS, build_id=7,
                  build_status="running", build_worker="a", build_token_jti=CLAIMS.jti,
                  worker_sign_key=WORKER.sign_public_key, now=START)


@settings(max_examples=150, deadline=None)
@given(wire=garbage)
def test_package_opener_garbage(wire):
    only_rejected(open_package, wire, identity=WORKER, pinned_server_keys=KEYS, hostname="a",
                  now=START)
    only_rejected(pin_key_set, wire, pinned=None)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), field=st.sampled_from(sorted(PACKAGE)), value=json_values)
def test_package_opener_field_replaced(data, field, value):
    wire = {**PACKAGE, field: value}
    if wire == PACKAGE:
        return
    only_rejected(open_package, wire, identity=WORKER, pinned_server_keys=KEYS, hostname="a",
                  now=START)
    nested = {**PACKAGE, "secrets": {**PACKAGE["secrets"],
                                     "ct": mutate(PACKAGE["secrets"]["ct"], data)}}
    only_rejected(open_package, nested, identity=WORKER, pinned_server_keys=KEYS,
                  hostname="a", now=START)
