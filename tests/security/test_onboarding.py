"""Onboarding: one-time registration tokens and re-registration by signature."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from vela.db.store import Store
from vela.security import (
    ChallengeBook,
    Purpose,
    Reason,
    Registration,
    Rejected,
    WorkerIdentity,
    answer_challenge,
    create_registration_token,
    hash_registration_token,
    mint_build_token,
    mint_registration_token,
    register_worker,
    reregister_worker,
)
from vela.security.onboarding import WORKER_PROTOCOL

from .conftest import ISSUER


async def rejected(reason, coro):
    with pytest.raises(Rejected) as e:
        await coro
    assert e.value.reason is reason, e.value


def reg(identity, hostname="a", routes=("vela",), **kw):
    return Registration(hostname=hostname, routes=list(routes), build_limit=2,
                        sign_public_key=identity.sign_public_key,
                        seal_public_key=identity.seal_public_key, **kw)


@pytest.fixture
def store(engine, master_key):
    """The real store, on SQLite and on PostgreSQL."""
    return Store(engine, master_key)


def test_token_format_and_hash():
    token, digest = mint_registration_token()
    assert token.startswith("vrt_") and len(token) == 47
    assert digest == hashlib.sha256(token.encode()).hexdigest() == hash_registration_token(token)
    assert mint_registration_token()[0] != token
    with pytest.raises(Rejected) as e:
        hash_registration_token("vrt_short")
    assert e.value.reason is Reason.MALFORMED


async def test_register_happy_path(store, clock, worker_a):
    token = await create_registration_token(store, routes=["vela", "gpu"], hostname=None,
                                            ttl_s=3600, now=clock.now)
    worker = await register_worker(store, reg(worker_a, routes=["gpu"]), token=token,
                                   now=clock.now)
    assert worker.hostname == "a" and worker.routes == ["gpu"]
    assert worker.key_thumbprint == worker_a.thumbprint
    assert worker.sign_public_key == worker_a.sign_public_key


async def test_registration_token_reused_rejected(store, clock, worker_a, worker_b):
    token = await create_registration_token(store, routes=["vela"], hostname=None, ttl_s=60,
                                            now=clock.now)
    await register_worker(store, reg(worker_a), token=token, now=clock.now)
    await rejected(Reason.REGISTRATION_USED,
                   register_worker(store, reg(worker_b, "b"), token=token, now=clock.now))


async def test_registration_token_redeemed_concurrently_only_once(store, clock, worker_a,
                                                                  worker_b):
    token = await create_registration_token(store, routes=["vela"], hostname=None, ttl_s=60,
                                            now=clock.now)
    results = await asyncio.gather(
        register_worker(store, reg(worker_a, "a"), token=token, now=clock.now),
        register_worker(store, reg(worker_b, "b"), token=token, now=clock.now),
        return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Rejected", "Worker"]


async def test_expired_registration_token_rejected(store, clock, worker_a):
    token = await create_registration_token(store, routes=["vela"], hostname=None, ttl_s=60,
                                            now=clock.now)
    clock.advance(60)
    await rejected(Reason.REGISTRATION_EXPIRED,
                   register_worker(store, reg(worker_a), token=token, now=clock.now))


async def test_unknown_registration_token_rejected(store, clock, worker_a):
    token, _ = mint_registration_token()
    await rejected(Reason.REGISTRATION_UNKNOWN,
                   register_worker(store, reg(worker_a), token=token, now=clock.now))


async def test_build_token_used_as_registration_token_rejected(store, clock, ring, worker_a):
    build_token, _ = mint_build_token(ring, issuer=ISSUER, build_id=1, worker="a",
                                      jkt=worker_a.thumbprint, timeout_s=60, grace_s=0,
                                      now=clock.now)
    await rejected(Reason.WRONG_TYPE,
                   register_worker(store, reg(worker_a), token=build_token, now=clock.now))


async def test_token_bound_to_another_hostname_rejected(store, clock, worker_a):
    token = await create_registration_token(store, routes=["vela"], hostname="b", ttl_s=60,
                                            now=clock.now)
    await rejected(Reason.REGISTRATION_MISMATCH,
                   register_worker(store, reg(worker_a, "a"), token=token, now=clock.now))


async def test_routes_beyond_the_token_rejected(store, clock, worker_a):
    token = await create_registration_token(store, routes=["vela"], hostname=None, ttl_s=60,
                                            now=clock.now)
    await rejected(Reason.REGISTRATION_MISMATCH,
                   register_worker(store, reg(worker_a, routes=["vela", "gpu"]), token=token,
                                   now=clock.now))


async def test_unbound_token_cannot_take_over_a_known_worker(store, clock, worker_a):
    first = await create_registration_token(store, routes=["vela"], hostname=None, ttl_s=60,
                                            now=clock.now)
    await register_worker(store, reg(worker_a), token=first, now=clock.now)
    attacker = WorkerIdentity.generate()
    leaked = await create_registration_token(store, routes=["vela"], hostname=None, ttl_s=60,
                                             now=clock.now)
    await rejected(Reason.REGISTRATION_MISMATCH,
                   register_worker(store, reg(attacker), token=leaked, now=clock.now))
    # An admin re-keys a worker with a token bound to its hostname.
    bound = await create_registration_token(store, routes=["vela"], hostname="a", ttl_s=60,
                                            now=clock.now)
    new_keys = WorkerIdentity.generate()
    worker = await register_worker(store, reg(new_keys), token=bound, now=clock.now)
    assert worker.key_thumbprint == new_keys.thumbprint


def test_registration_validates_its_fields(worker_a):
    from pydantic import ValidationError
    bad = [dict(hostname="-bad"), dict(hostname="a b"), dict(routes=[]),
           dict(routes=["ok", "no spaces"]), dict(sign_public_key="AAAA"),
           dict(seal_public_key=worker_a.sign_public_key + "A"),
           dict(backlog=-1), dict(backlog=65)]
    for over in bad:
        with pytest.raises(ValidationError):
            Registration(**{**reg(worker_a).model_dump(), **over})
    with pytest.raises(Rejected) as e:
        Registration.from_wire({"hostname": "a"})
    assert e.value.reason is Reason.MALFORMED
    # No backlog on the wire (a worker without one, or older than it): none.
    wire = reg(worker_a).model_dump(mode="json", exclude={"backlog"})
    assert Registration.from_wire(wire).backlog == 0


def test_a_worker_of_another_protocol_is_refused_with_what_to_do(worker_a):
    """A worker that cannot follow this server's packages, receipts and report calls is
    refused at registration, saying both protocols and to install one vela version —
    not at every build it would run."""
    wire = reg(worker_a).model_dump(mode="json")
    assert wire["protocol"] == WORKER_PROTOCOL
    assert Registration.from_wire(wire).protocol == WORKER_PROTOCOL
    for other, spoken in [({k: v for k, v in wire.items() if k != "protocol"}, 1),
                          ({**wire, "protocol": 1}, 1),
                          ({**wire, "protocol": WORKER_PROTOCOL + 1}, WORKER_PROTOCOL + 1)]:
        with pytest.raises(Rejected) as e:
            Registration.from_wire(other)
        assert e.value.reason is Reason.WORKER_PROTOCOL_MISMATCH
        assert f"speaks protocol {spoken}, this server {WORKER_PROTOCOL}" in str(e.value)
        assert "same vela version" in str(e.value)
    with pytest.raises(Rejected) as e:  # malformed first, whatever it says of its protocol
        Registration.from_wire({"hostname": "a", "protocol": 1})
    assert e.value.reason is Reason.MALFORMED


@pytest.fixture
async def registered(store, clock, worker_a):
    token = await create_registration_token(store, routes=["vela", "gpu"], hostname=None,
                                            ttl_s=60, now=clock.now)
    await register_worker(store, reg(worker_a, routes=["vela", "gpu"]), token=token,
                          now=clock.now)
    return store


async def test_reregister_by_signature(registered, clock, worker_a):
    book = ChallengeBook(server_id="srv", ttl_s=10)
    ch = book.issue(hostname="a", build_id=None, now=clock.now, purpose=Purpose.REREGISTER)
    ans = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=2)
    worker = await reregister_worker(registered, reg(worker_a, routes=["vela"]), book=book,
                                     challenge=ch, answer=ans, now=clock.now)
    assert worker.routes == ["vela"] and worker.key_thumbprint == worker_a.thumbprint


async def test_reregister_with_another_key_rejected(registered, clock, worker_a, worker_b):
    book = ChallengeBook(server_id="srv", ttl_s=10)
    ch = book.issue(hostname="a", build_id=None, now=clock.now, purpose=Purpose.REREGISTER)
    ans = answer_challenge(ch, identity=worker_b, hostname="a", free_slots=2)
    await rejected(Reason.ANSWER_BAD_SIGNATURE,
                   reregister_worker(registered, reg(worker_b), book=book, challenge=ch,
                                     answer=ans, now=clock.now))


async def test_reregister_cannot_change_keys_or_widen_routes(registered, clock, worker_a):
    book = ChallengeBook(server_id="srv", ttl_s=10)
    for registration in (
        reg(worker_a).model_copy(update={"seal_public_key":
                                         WorkerIdentity.generate().seal_public_key}),
        reg(worker_a, routes=["vela", "gpu", "arm"]),
    ):
        ch = book.issue(hostname="a", build_id=None, now=clock.now, purpose=Purpose.REREGISTER)
        ans = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=2)
        await rejected(Reason.REGISTRATION_MISMATCH,
                       reregister_worker(registered, registration, book=book, challenge=ch,
                                         answer=ans, now=clock.now))


async def test_reregister_unknown_worker_or_dispatch_challenge_rejected(registered, clock,
                                                                        worker_a, worker_b):
    book = ChallengeBook(server_id="srv", ttl_s=10)
    ch = book.issue(hostname="b", build_id=None, now=clock.now, purpose=Purpose.REREGISTER)
    ans = answer_challenge(ch, identity=worker_b, hostname="b", free_slots=1)
    await rejected(Reason.WORKER_UNKNOWN,
                   reregister_worker(registered, reg(worker_b, "b"), book=book, challenge=ch,
                                     answer=ans, now=clock.now))
    ch = book.issue(hostname="a", build_id=3, now=clock.now)
    ans = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=1)
    await rejected(Reason.CHALLENGE_MISMATCH,
                   reregister_worker(registered, reg(worker_a), book=book, challenge=ch,
                                     answer=ans, now=clock.now))


async def test_register_disabled_worker_rejected_whatever_the_token(registered, clock,
                                                                     worker_a):
    """A deactivated worker stays out until an admin activates it: neither a leaked
    unbound token (its keys unchanged) nor one bound to its hostname brings it back,
    and the refused token stays unspent."""
    await registered.update_worker("a", active=False)
    for hostname in (None, "a"):
        token = await create_registration_token(registered, routes=["vela"],
                                                hostname=hostname, ttl_s=60, now=clock.now)
        await rejected(Reason.WORKER_DISABLED,
                       register_worker(registered, reg(worker_a), token=token, now=clock.now))
    await registered.update_worker("a", active=True)
    worker = await register_worker(registered, reg(worker_a), token=token, now=clock.now)
    assert worker.active


async def test_reregister_disabled_worker_rejected(registered, clock, worker_a):
    await registered.update_worker("a", active=False)
    book = ChallengeBook(server_id="srv", ttl_s=10)
    ch = book.issue(hostname="a", build_id=None, now=clock.now, purpose=Purpose.REREGISTER)
    ans = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=1)
    await rejected(Reason.WORKER_DISABLED,
                   reregister_worker(registered, reg(worker_a), book=book, challenge=ch,
                                     answer=ans, now=clock.now))
