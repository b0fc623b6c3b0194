"""Build and API tokens: every way a forged, misused or confused token is refused."""

from __future__ import annotations

import jwt
import pytest

from vela.security import (
    KeyRing,
    Reason,
    Rejected,
    mint_api_token,
    mint_build_token,
    mint_registration_token,
    verify_api_token,
    verify_build_token,
)
from vela.security._codec import timestamp
from vela.security.onboarding import hash_registration_token

from .conftest import ISSUER
from .helpers import build_claims, forge, hs256, unsigned


def mint(ring, clock, worker_a, **kw):
    args = dict(issuer=ISSUER, build_id=7, worker="a", jkt=worker_a.thumbprint,
                timeout_s=600, grace_s=60, now=clock.now)
    args.update(kw)
    return mint_build_token(ring, **args)


def verify(token, ring, clock, **kw):
    return verify_build_token(token, keys=ring.verifying_keys(clock.now),
                              issuer=kw.pop("issuer", ISSUER), now=clock.now, **kw)


def rejected(reason, fn, *args, **kwargs):
    with pytest.raises(Rejected) as e:
        fn(*args, **kwargs)
    assert e.value.reason is reason, e.value
    return e.value


def test_happy_path_claims_and_header(ring, clock, worker_a):
    token, claims = mint(ring, clock, worker_a)
    got = verify(token, ring, clock)
    assert got == claims
    assert got.build_id == 7 and got.wkr == "a" and got.cnf.jkt == worker_a.thumbprint
    assert got.exp - got.iat == 660 and got.nbf == got.iat
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": ring.active.kid, "typ": "vela-build+jwt"}
    # Interoperable: plain pyjwt verifies it with the public key.
    from vela.security.keys import load_public_key
    payload = jwt.decode(token, load_public_key(ring.active.public_key), algorithms=["EdDSA"],
                         audience="vela:build", options={"verify_exp": False,
                                                         "verify_nbf": False,
                                                         "verify_iat": False})
    assert payload["sub"] == "7"


def test_alg_none_rejected(ring, clock):
    now = int(timestamp(clock.now))
    token = unsigned({"alg": "none", "typ": "vela-build+jwt", "kid": ring.active.kid},
                     build_claims(now))
    rejected(Reason.ALG_NOT_ALLOWED, verify, token, ring, clock)
    rejected(Reason.ALG_NOT_ALLOWED, verify, token.rsplit(".", 1)[0] + ".", ring, clock)


def test_hs256_signed_with_public_key_as_secret_rejected(ring, clock):
    now = int(timestamp(clock.now))
    header = {"alg": "HS256", "typ": "vela-build+jwt", "kid": ring.active.kid}
    for secret in (ring.active.public_key.encode(), ring.active.public_key.encode() + b"\n"):
        rejected(Reason.ALG_NOT_ALLOWED, verify, hs256(header, build_claims(now), secret),
                 ring, clock)


def test_unknown_kid_rejected(ring, clock, worker_a):
    token = forge(ring, build_claims(int(timestamp(clock.now))), kid="no-such-key")
    rejected(Reason.UNKNOWN_KID, verify, token, ring, clock)
    no_kid = forge(ring, build_claims(int(timestamp(clock.now))), kid=None)
    rejected(Reason.UNKNOWN_KID, verify, no_kid, ring, clock)


def test_signed_by_other_key_under_our_kid_rejected(ring, clock, worker_a):
    other = KeyRing.generate(clock.now)
    token = forge(other, build_claims(int(timestamp(clock.now))), kid=ring.active.kid)
    rejected(Reason.BAD_SIGNATURE, verify, token, ring, clock)


def test_other_servers_key_is_unknown(ring, clock, worker_a):
    token, _ = mint(KeyRing.generate(clock.now), clock, worker_a)
    rejected(Reason.UNKNOWN_KID, verify, token, ring, clock)


def test_payload_swapped_under_valid_signature_rejected(ring, clock, worker_a):
    a, _ = mint(ring, clock, worker_a, build_id=1)
    b, _ = mint(ring, clock, worker_a, build_id=2)
    h, _, s = a.split(".")
    rejected(Reason.BAD_SIGNATURE, verify, f"{h}.{b.split('.')[1]}.{s}", ring, clock)


def test_expired_rejected(ring, clock, worker_a):
    token, claims = mint(ring, clock, worker_a)
    clock.advance(660 + 4)
    verify(token, ring, clock)  # within the leeway
    clock.advance(2)
    rejected(Reason.EXPIRED, verify, token, ring, clock)


def test_not_yet_valid_rejected(ring, clock, worker_a):
    now = int(timestamp(clock.now))
    token = forge(ring, build_claims(now, nbf=now + 60, iat=now, exp=now + 600))
    rejected(Reason.NOT_YET_VALID, verify, token, ring, clock)
    token = forge(ring, build_claims(now, iat=now + 60))
    rejected(Reason.NOT_YET_VALID, verify, token, ring, clock)


def test_wrong_audience_rejected(ring, clock):
    token = forge(ring, build_claims(int(timestamp(clock.now)), aud="vela:api"))
    rejected(Reason.WRONG_AUDIENCE, verify, token, ring, clock)


def test_wrong_issuer_rejected(ring, clock, worker_a):
    token, _ = mint(ring, clock, worker_a)
    rejected(Reason.WRONG_ISSUER, verify, token, ring, clock, issuer="another-server")


def test_claims_of_wrong_shape_are_malformed(ring, clock):
    now = int(timestamp(clock.now))
    for bad in ({"sub": 7}, {"iat": "1"}, {"exp": True}, {"extra": 1}, {"sub": "07"},
                {"cnf": {}}):
        rejected(Reason.MALFORMED, verify, forge(ring, build_claims(now, **bad)), ring, clock)


def test_rotated_key_verifies_until_its_tokens_expire(ring, clock, worker_a):
    old_token, claims = mint(ring, clock, worker_a)
    rotated = ring.rotated(now=clock.now, verify_until=clock.now.replace(year=2031))
    new_token, _ = mint(rotated, clock, worker_a)
    assert rotated.active.kid != ring.active.kid
    verify(old_token, rotated, clock)
    verify(new_token, rotated, clock)
    clock.now = clock.now.replace(year=2031)
    assert set(rotated.verifying_keys(clock.now)) == {rotated.active.kid}
    rejected(Reason.UNKNOWN_KID, verify, old_token, rotated, clock)


def test_api_token_happy_path(ring, clock):
    token, claims = mint_api_token(ring, issuer=ISSUER, subject="admin", scopes=["admin"],
                                   ttl_s=3600, now=clock.now)
    got = verify_api_token(token, keys=ring.verifying_keys(clock.now), issuer=ISSUER,
                           now=clock.now)
    assert got == claims and got.scp == ["admin"]


def test_token_types_are_mutually_exclusive(ring, clock, worker_a):
    build, _ = mint(ring, clock, worker_a)
    api, _ = mint_api_token(ring, issuer=ISSUER, subject="admin", scopes=["admin"],
                            ttl_s=3600, now=clock.now)
    registration, _ = mint_registration_token()
    keys = ring.verifying_keys(clock.now)
    as_build = lambda t: verify_build_token(t, keys=keys, issuer=ISSUER, now=clock.now)  # noqa: E731
    as_api = lambda t: verify_api_token(t, keys=keys, issuer=ISSUER, now=clock.now)  # noqa: E731
    rejected(Reason.WRONG_TYPE, as_build, api)
    rejected(Reason.WRONG_TYPE, as_build, registration)
    rejected(Reason.WRONG_TYPE, as_api, build)
    rejected(Reason.WRONG_TYPE, as_api, registration)
    rejected(Reason.WRONG_TYPE, hash_registration_token, build)
    rejected(Reason.WRONG_TYPE, hash_registration_token, api)
    # A build-typed token with the API audience still fails (and vice versa).
    now = int(timestamp(clock.now))
    rejected(Reason.WRONG_AUDIENCE, as_build, forge(ring, build_claims(now, aud="vela:api")))


def test_garbage_is_malformed(ring, clock):
    for junk in ("", "a.b", "a.b.c", "....", "x" * 9000, None, 12, b"a.b.c"):
        rejected(Reason.MALFORMED, verify, junk, ring, clock)


def test_alternative_spelling_of_the_same_signature_rejected(ring, clock, worker_a):
    token, _ = mint(ring, clock, worker_a)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # The last character of an 86-character signature carries 4 padding bits.
    last = alphabet.index(token[-1])
    twin = token[:-1] + alphabet[last ^ 1]
    rejected(Reason.MALFORMED, verify, twin, ring, clock)


def test_rejection_pickles_with_its_reason():
    import pickle
    err = pickle.loads(pickle.dumps(Rejected(Reason.PROOF_STALE, "build 7")))
    assert err.reason is Reason.PROOF_STALE and "build 7" in str(err)
    assert repr(err) == "Rejected('proof_stale')"
