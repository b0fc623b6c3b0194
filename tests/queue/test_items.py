"""Item format, signing and the refusal reasons."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.queue.conftest import signed
from vela.errors import VelaError
from vela.queue import InvalidReason, ItemSigner, ItemVerifier, QueueItem, QueueItemInvalid
from vela.queue.item import SIGNING_CONTEXT, canonical_json, peek


def refused(verifier: ItemVerifier, raw: bytes, route: str = "vela") -> InvalidReason:
    with pytest.raises(QueueItemInvalid) as e:
        verifier.verify(raw, route=route)
    assert isinstance(e.value, VelaError)
    assert e.value.reason.value in str(e.value)
    return e.value.reason


def test_round_trip(signer, verifier):
    item = QueueItem.new(42, "gpu", attempt=3, now=1_700_000_000.25)
    raw = signer.sign(item)
    assert verifier.verify(raw, route="gpu") == item
    envelope = json.loads(raw)
    assert set(envelope) == {"item", "kid", "sig"}
    assert envelope["kid"] == "q1"
    assert envelope["item"] == {"v": 1, "build_id": 42, "route": "gpu",
                                "enqueued_at": 1_700_000_000.25, "attempt": 3}
    assert b" " not in raw and b"=" not in raw, "compact JSON, unpadded base64url"


def test_signature_covers_canonical_bytes_with_context(queue_key, signer):
    raw = signer.sign(QueueItem.new(1, "vela", now=5.0))
    envelope = json.loads(raw)
    from vela.queue.item import _unb64url

    queue_key.public_key().verify(_unb64url(envelope["sig"]),
                                  SIGNING_CONTEXT + canonical_json(envelope["item"]))


def test_whitespace_and_key_order_do_not_matter(signer, verifier):
    envelope = json.loads(signed(signer, 7))
    pretty = json.dumps({"sig": envelope["sig"], "kid": "q1",
                         "item": dict(reversed(envelope["item"].items()))}, indent=2).encode()
    assert verifier.verify(pretty, route="vela").build_id == 7


@pytest.mark.parametrize("raw", [
    b"", b"garbage", b"\xff\xfe", b"[1, 2]", b'"text"', b"[" * 3000 + b"]" * 3000,
    b'{"item": {}, "kid": "q1", "sig": "AA", "extra": 1}',
    b'{"item": "not an object", "kid": "q1", "sig": "AA"}',
    b'{"item": {}, "kid": 5, "sig": "AA"}',
])
def test_malformed(raw):
    verifier = ItemVerifier({}, ["vela"], max_bytes=100_000)
    assert refused(verifier, raw) is InvalidReason.MALFORMED


def test_signed_but_wrong_schema_is_malformed(queue_key, verifier):
    signer = ItemSigner(queue_key, "q1")
    from vela.queue.item import _b64url

    for body in ({"v": 1, "build_id": "7", "route": "vela", "enqueued_at": 1.0, "attempt": 1},
                 {"v": 2, "build_id": 7, "route": "vela", "enqueued_at": 1.0, "attempt": 1},
                 {"v": 1, "build_id": 7, "route": "vela", "enqueued_at": 1.0, "attempt": 1,
                  "secret": "x"}):
        sig = queue_key.sign(SIGNING_CONTEXT + canonical_json(body))
        raw = canonical_json({"item": body, "kid": signer.kid, "sig": _b64url(sig)})
        assert refused(verifier, raw) is InvalidReason.MALFORMED


def test_nan_is_malformed(verifier):
    raw = b'{"item": {"enqueued_at": NaN}, "kid": "q1", "sig": "AA"}'
    assert refused(verifier, raw) is InvalidReason.MALFORMED


@pytest.mark.parametrize("value", [b"1e400", b'"\\ud800"'])
def test_unsignable_values_are_malformed(verifier, value):
    """JSON that parses but cannot be canonical bytes (an infinite number, a lone
    surrogate) was never signed: refused as malformed, not with another error that
    would fail the listener's whole pass, every time the item comes back."""
    raw = (b'{"item":{"attempt":1,"build_id":1,"enqueued_at":' + value
           + b',"route":"vela","v":1},"kid":"q1","sig":"' + b"A" * 86 + b'"}')
    with pytest.raises(QueueItemInvalid) as e:
        verifier.verify(raw, route="vela")
    assert e.value.reason is InvalidReason.MALFORMED


def test_too_large_is_checked_before_parsing(signer):
    verifier = ItemVerifier({}, ["vela"], max_bytes=64)
    assert refused(verifier, b"x" * 65) is InvalidReason.TOO_LARGE
    assert refused(verifier, signed(signer, 1)) is InvalidReason.TOO_LARGE


def test_unsigned(signer, verifier):
    envelope = json.loads(signed(signer, 1))
    bare = json.dumps(envelope["item"]).encode()
    assert refused(verifier, bare) is InvalidReason.UNSIGNED
    no_sig = json.dumps({"item": envelope["item"], "kid": "q1"}).encode()
    assert refused(verifier, no_sig) is InvalidReason.UNSIGNED
    null_sig = json.dumps({"item": envelope["item"], "kid": "q1", "sig": None}).encode()
    assert refused(verifier, null_sig) is InvalidReason.UNSIGNED


def test_tampered_item_fails_the_signature(signer, verifier):
    envelope = json.loads(signed(signer, 1))
    envelope["item"]["build_id"] = 2
    assert refused(verifier, json.dumps(envelope).encode()) is InvalidReason.BAD_SIGNATURE


@pytest.mark.parametrize("sig", ["", "AA", "not base64!", "A" * 86, "A" * 100])
def test_garbled_signature(signer, verifier, sig):
    envelope = json.loads(signed(signer, 1))
    envelope["sig"] = sig
    assert refused(verifier, json.dumps(envelope).encode()) is InvalidReason.BAD_SIGNATURE


def test_kid_swapped_to_another_trusted_key_fails(queue_key, signer):
    other = Ed25519PrivateKey.generate()
    verifier = ItemVerifier({"q1": queue_key.public_key(), "q2": other.public_key()},
                            ["vela"], 4096)
    envelope = json.loads(signed(signer, 1))
    envelope["kid"] = "q2"
    assert refused(verifier, json.dumps(envelope).encode()) is InvalidReason.BAD_SIGNATURE


def test_unknown_kid_and_rotation(verifier):
    new_key = Ed25519PrivateKey.generate()
    raw = signed(ItemSigner(new_key, "q2"), 1)
    assert refused(verifier, raw) is InvalidReason.UNKNOWN_KID
    rotating = ItemVerifier({}, ["vela"], 4096)
    rotating.trust("q2", new_key.public_key())
    assert rotating.verify(raw, route="vela").build_id == 1
    rotating.distrust("q2")
    assert refused(rotating, raw) is InvalidReason.UNKNOWN_KID


def test_forged_with_another_key_under_our_kid(verifier):
    forger = ItemSigner(Ed25519PrivateKey.generate(), "q1")
    assert refused(verifier, signed(forger, 1)) is InvalidReason.BAD_SIGNATURE


def test_unknown_route(signer, verifier):
    assert refused(verifier, signed(signer, 1, route="nope")) is InvalidReason.UNKNOWN_ROUTE
    assert refused(verifier, signed(signer, 1, route="nope"), route="nope") \
        is InvalidReason.UNKNOWN_ROUTE


def test_route_mismatch(signer, verifier):
    assert refused(verifier, signed(signer, 1, route="gpu"), route="vela") \
        is InvalidReason.ROUTE_MISMATCH


def test_reason_codes_are_stable():
    assert {r.value for r in InvalidReason} == {
        "malformed", "too_large", "unknown_route", "route_mismatch", "unsigned",
        "bad_signature", "unknown_kid",
    }


def test_item_model_validation():
    with pytest.raises(ValueError):
        QueueItem.new(0, "vela")
    with pytest.raises(ValueError):
        QueueItem.new(1, "")
    with pytest.raises(ValueError):
        QueueItem.new(1, "vela", attempt=0)
    assert QueueItem.new(1, "vela").attempt == 1


def test_signer_needs_a_kid(queue_key):
    with pytest.raises(ValueError):
        ItemSigner(queue_key, "")


def test_peek_is_for_display(signer):
    assert peek(signed(signer, 9))["build_id"] == 9
    assert peek(b'{"build_id": 3}') == {"build_id": 3}
    assert peek(b"garbage") is None
    assert peek(b"[1]") is None
