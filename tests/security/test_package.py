"""Sealed packages: only the addressed worker opens them, and only untampered."""

from __future__ import annotations

import pickle

import pytest

from vela.security import (
    KeyRing,
    Package,
    Reason,
    Rejected,
    mint_build_token,
    open_package,
    seal_package,
)
from vela.security._codec import b64u, b64u_decode
from vela.security.seal import seal

from .conftest import ISSUER

SECRETS = {"api_key": "s3cr3t-VALUE-do-not-leak", "docker_password": "hunter2-PASSWORD"}


def rejected(reason, fn, *args, **kwargs):
    with pytest.raises(Rejected) as e:
        fn(*args, **kwargs)
    assert e.value.reason is reason, e.value


def make(ring, clock, *, to, hostname="a", jkt=None, build_id=7, token_build=None,
         secrets=SECRETS):
    token, _ = mint_build_token(ring, issuer=ISSUER, build_id=token_build or build_id,
                                worker=hostname, jkt=jkt or to.thumbprint, timeout_s=600,
                                grace_s=60, now=clock.now)
    return seal_package(ring=ring, server_id=ISSUER, build_id=build_id, worker=hostname,
                        worker_seal_key=to.seal_public_key,
                        build={"repo": "org/app", "number": 3, "ref": "main"},
                        executable='{"steps":[{"name":"test"}]}', secrets=secrets,
                        build_token=token, now=clock.now, ttl_s=60)


def opener(ring, clock, identity, hostname="a"):
    return lambda pkg: open_package(pkg, identity=identity,
                                    pinned_server_keys=ring.verifying_keys(clock.now),
                                    hostname=hostname, now=clock.now)


def resign(ring, pkg, **update):
    """What a server holding the signing key could produce: changed *and* re-signed."""
    changed = pkg.model_copy(update=update)
    return changed.model_copy(update={"signature": b64u(ring.active.sign(
        changed.signed_bytes()))})


def test_happy_path_and_wire_roundtrip(ring, clock, worker_a):
    pkg = make(ring, clock, to=worker_a)
    wire = pkg.to_wire()
    assert Package.from_wire(wire) == pkg
    assert pickle.loads(pickle.dumps(pkg)) == pkg
    clock.advance(5)
    opened = opener(ring, clock, worker_a)(wire)
    assert opened.secrets == SECRETS
    assert opened.build_id == 7 and opened.worker == "a" and opened.build["repo"] == "org/app"
    assert opened.claims.cnf.jkt == worker_a.thumbprint
    assert opened.build_token == pkg.build_token
    for text in (repr(pkg), repr(opened), str(wire["secrets"])):
        for value in SECRETS.values():
            assert value not in text
    assert pkg.build_token not in repr(pkg) and pkg.build_token not in repr(opened)


def test_empty_secrets(ring, clock, worker_a):
    assert opener(ring, clock, worker_a)(make(ring, clock, to=worker_a, secrets={})).secrets == {}


TAMPER = {
    "version": 2,
    "package_id": "A" * 22,
    "server_id": "evil-server",
    "build_id": 8,
    "worker": "b",
    "build": {"repo": "org/other", "number": 3, "ref": "main"},
    "executable": '{"steps":[{"name":"exfiltrate"}]}',
    "issued_at": 1,
    "expires_at": 4_000_000_000,
    "signature": b64u(bytes(64)),
}


@pytest.mark.parametrize("name", sorted(TAMPER))
def test_every_field_tampered_rejected(ring, clock, worker_a, name):
    wire = make(ring, clock, to=worker_a).to_wire()
    wire[name] = TAMPER[name]
    reason = Reason.MALFORMED if name == "version" else Reason.PACKAGE_TAMPERED
    rejected(reason, opener(ring, clock, worker_a), wire)


def test_tampered_secrets_rejected(ring, clock, worker_a, worker_b):
    pkg = make(ring, clock, to=worker_a)
    other = make(ring, clock, to=worker_a)
    wire = pkg.to_wire()
    ct = b64u_decode(wire["secrets"]["ct"])
    for box in ({**wire["secrets"], "ct": b64u(ct[:-1] + bytes([ct[-1] ^ 1]))},
                {**wire["secrets"], "epk": other.secrets.epk},
                other.to_wire()["secrets"]):
        rejected(Reason.PACKAGE_TAMPERED, opener(ring, clock, worker_a), {**wire, "secrets": box})


def test_tampered_build_token_rejected(ring, clock, worker_a):
    pkg = make(ring, clock, to=worker_a)
    other = make(ring, clock, to=worker_a, build_id=8)
    rejected(Reason.PACKAGE_TAMPERED, opener(ring, clock, worker_a),
             {**pkg.to_wire(), "build_token": other.build_token})


def test_tampered_kid_rejected(ring, clock, worker_a):
    wire = make(ring, clock, to=worker_a).to_wire()
    rejected(Reason.PACKAGE_UNKNOWN_SIGNER, opener(ring, clock, worker_a),
             {**wire, "kid": "someone-else"})
    rotated = ring.rotated(now=clock.now, verify_until=clock.now.replace(year=2031))
    rejected(Reason.PACKAGE_TAMPERED, opener(rotated, clock, worker_a),
             {**wire, "kid": rotated.active.kid})


def test_package_for_another_worker_rejected(ring, clock, worker_a, worker_b):
    pkg = make(ring, clock, to=worker_b, hostname="b")
    rejected(Reason.PACKAGE_NOT_FOR_ME, opener(ring, clock, worker_a, hostname="a"), pkg)


def test_package_named_for_me_but_sealed_to_another_key_rejected(ring, clock, worker_a, worker_b):
    # Only a server bug (or its key) could produce this; the worker still refuses it.
    pkg = make(ring, clock, to=worker_b, hostname="a", jkt=worker_a.thumbprint)
    rejected(Reason.SEALED_SECRET_INVALID, opener(ring, clock, worker_a), pkg)


def test_token_bound_to_another_worker_rejected(ring, clock, worker_a, worker_b):
    pkg = make(ring, clock, to=worker_a, jkt=worker_b.thumbprint)
    rejected(Reason.PACKAGE_NOT_FOR_ME, opener(ring, clock, worker_a), pkg)


def test_token_for_another_build_rejected(ring, clock, worker_a):
    pkg = make(ring, clock, to=worker_a, token_build=8)
    rejected(Reason.WRONG_BUILD, opener(ring, clock, worker_a), pkg)


def test_package_signed_by_unknown_server_key_rejected(ring, clock, worker_a):
    stranger = KeyRing.generate(clock.now)
    pkg = make(stranger, clock, to=worker_a)
    rejected(Reason.PACKAGE_UNKNOWN_SIGNER, opener(ring, clock, worker_a), pkg)


def test_expired_package_rejected(ring, clock, worker_a):
    pkg = make(ring, clock, to=worker_a)
    clock.advance(60)
    rejected(Reason.PACKAGE_EXPIRED, opener(ring, clock, worker_a), pkg)


def test_truncated_ciphertext_rejected(ring, clock, worker_a):
    pkg = make(ring, clock, to=worker_a)
    ct = b64u_decode(pkg.secrets.ct)
    for cut in (ct[:-1], ct[:28], ct[:12], b""):
        box = pkg.secrets.model_copy(update={"ct": b64u(cut)})
        # Unsigned truncation breaks the server signature ...
        rejected(Reason.PACKAGE_TAMPERED, opener(ring, clock, worker_a),
                 pkg.model_copy(update={"secrets": box}))
        # ... and even re-signed it does not decrypt.
        rejected(Reason.SEALED_SECRET_INVALID, opener(ring, clock, worker_a),
                 resign(ring, pkg, secrets=box))


def test_secrets_moved_between_packages_do_not_open(ring, clock, worker_a):
    """Associated data binds the box to its package, build and worker."""
    pkg = make(ring, clock, to=worker_a)
    other = make(ring, clock, to=worker_a, secrets={"api_key": "other"})
    rejected(Reason.SEALED_SECRET_INVALID, opener(ring, clock, worker_a),
             resign(ring, pkg, secrets=other.secrets))


def test_sealed_non_dict_rejected(ring, clock, worker_a):
    pkg = make(ring, clock, to=worker_a)
    from vela.security.package import _aad
    box = seal(worker_a.seal_public_key, b'["not", "a", "dict"]',
               _aad(package_id=pkg.package_id, build_id=7, worker="a", server_id=ISSUER))
    rejected(Reason.SEALED_SECRET_INVALID, opener(ring, clock, worker_a),
             resign(ring, pkg, secrets=box))


def test_malformed_wire_rejected(ring, clock, worker_a):
    wire = make(ring, clock, to=worker_a).to_wire()
    for bad in (None, "pkg", [], {}, {**wire, "extra": 1}, {**wire, "build_id": "7"},
                {k: v for k, v in wire.items() if k != "signature"}):
        rejected(Reason.MALFORMED, opener(ring, clock, worker_a), bad)
