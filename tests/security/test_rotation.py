"""Server key rotation on a running system: the rule (vela/server/keys.py), the holders
that follow the database (RingHolder in the Authority), their rate limit. Time moves by
an injected clock; nothing sleeps."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from vela.api.auth import MAX_TOKEN_TTL_S
from vela.config import Settings
from vela.db.store import Store
from vela.errors import VelaError
from vela.security import (
    KeyRing,
    Reason,
    Rejected,
    WorkerIdentity,
    load_or_create_keyring,
    make_proof,
    mint_build_token,
    reports_hash,
    rotate_keyring,
    verify_api_token,
)
from vela.security.keys import PURPOSE_QUEUE, PURPOSE_TOKEN, RingHolder
from vela.server.authority import Authority
from vela.server.builds import MAX_BUILD_TIMEOUT_S
from vela.server.keys import list_keys, retired_key_lifetime, rotate_keys

from .conftest import ISSUER

PERIOD = 30.0


def settings(**tokens) -> Settings:
    return Settings.model_validate({"server": {"id": ISSUER},
                                    "tokens": {"key_reload_s": PERIOD, **tokens}})


async def key_set_keys(authority: Authority) -> dict[str, str]:
    return (await authority.key_set())["keys"]


async def test_a_rotated_in_key_verifies_at_once_and_signs_from_its_switch(
        fake_store, master_key, clock):
    ring = await load_or_create_keyring(fake_store, purpose=PURPOSE_TOKEN,
                                        master_key=master_key, now=clock.now)
    old = ring.active.kid
    switch = clock.now + timedelta(seconds=60)
    until = switch + timedelta(days=1)
    await rotate_keyring(fake_store, ring, master_key=master_key, now=clock.now,
                         verify_until=until, switch_at=switch)
    stored = await load_or_create_keyring(fake_store, purpose=PURPOSE_TOKEN,
                                          master_key=master_key, now=clock.now)
    [new] = set(stored.verifying_keys(clock.now)) - {old}
    assert stored.active.kid == old and stored.rotating_until(clock.now) == switch
    later = KeyRing(stored.keys, purpose=PURPOSE_TOKEN, now=switch)
    assert later.active.kid == new and set(later.verifying_keys(switch)) == {old, new}
    assert set(later.verifying_keys(until)) == {new}


def test_a_retired_key_verifies_as_long_as_anything_it_signed_lives():
    s = settings(build_token_grace_s=300)
    assert retired_key_lifetime(s) == timedelta(seconds=MAX_TOKEN_TTL_S)
    s.api.token_ttl_s = MAX_TOKEN_TTL_S + 10
    assert retired_key_lifetime(s) == timedelta(seconds=MAX_TOKEN_TTL_S + 10)
    s.tokens.build_token_grace_s = MAX_TOKEN_TTL_S
    assert retired_key_lifetime(s) == timedelta(seconds=MAX_BUILD_TIMEOUT_S + MAX_TOKEN_TTL_S)


async def test_rotate_keys_on_the_database(engine, master_key, clock):
    store = Store(engine, master_key)
    s = settings()
    before = {p: (await load_or_create_keyring(store, purpose=p, master_key=master_key,
                                               now=clock.now)).active.kid
              for p in (PURPOSE_TOKEN, PURPOSE_QUEUE)}
    done = await rotate_keys(store, s, master_key, purposes=[PURPOSE_TOKEN, PURPOSE_QUEUE],
                             now=clock.now)
    switch = clock.now + timedelta(seconds=2 * PERIOD)
    until = switch + timedelta(seconds=PERIOD) + retired_key_lifetime(s)
    assert [(r.purpose, r.retired, r.switch_at, r.verify_until) for r in done] == [
        (PURPOSE_TOKEN, [before[PURPOSE_TOKEN]], switch, until),
        (PURPOSE_QUEUE, [before[PURPOSE_QUEUE]], switch, until)]

    infos = {k.kid: k for k in await list_keys(store, now=clock.now)}
    for r in done:
        old, new = infos[before[r.purpose]], infos[r.kid]
        assert old.active and old.verifies and old.retired_at == switch
        assert old.verify_until == until
        assert not new.active and new.verifies and new.created_at == switch
        assert not hasattr(new, "private_enc") and "private" not in str(new.as_dict())

    # One rotation at a time: another before the switch would leave a key never retired.
    with pytest.raises(VelaError, match="being rotated"):
        await rotate_keys(store, s, master_key, purposes=[PURPOSE_QUEUE],
                          now=clock.advance(PERIOD))
    assert len(await list_keys(store, now=clock.now)) == 4

    clock.advance(PERIOD + 1)  # past the switch
    infos = {k.kid: k for k in await list_keys(store, now=clock.now)}
    assert {k.kid for k in infos.values() if k.active} == {r.kid for r in done}
    again = await rotate_keys(store, s, master_key, purposes=[PURPOSE_TOKEN], now=clock.now,
                              verify_for=timedelta(0))
    assert again[0].retired == [done[0].kid]
    ring = await load_or_create_keyring(store, purpose=PURPOSE_TOKEN, master_key=master_key,
                                        now=again[0].switch_at)
    # Cut short: every old key stops at the switch, also the first rotation's (a
    # compromise may have leaked it with the other).
    assert set(ring.verifying_keys(again[0].switch_at)) == {again[0].kid}
    assert again[0].cut == [before[PURPOSE_TOKEN]]

    with pytest.raises(VelaError, match="purpose"):
        await rotate_keys(store, s, master_key, purposes=["nope"], now=clock.now)


async def test_the_authority_follows_a_rotation_in_the_database(engine, master_key, clock):
    store = Store(engine, master_key)
    s = settings()
    authority = await Authority.load(store, s, master_key, clock=lambda: clock.now)
    old = authority.ring.active.kid
    minted = await authority.mint_api_token(subject="ci", scopes=["builds:read"],
                                            ttl_s=24 * 3600)
    [r] = await rotate_keys(store, s, master_key, purposes=[PURPOSE_TOKEN], now=clock.now,
                            verify_for=timedelta(hours=1))

    # Before the switch it still signs with the old key, but already publishes the new one.
    clock.advance(PERIOD + 1)
    assert set(await key_set_keys(authority)) == {old, r.kid}
    assert authority.ring.active.kid == old

    clock.advance(PERIOD)  # past the switch
    fresh = await authority.mint_api_token(subject="ci", scopes=["builds:read"], ttl_s=600)
    keys = await key_set_keys(authority)
    for token, kid in ((minted, old), (fresh, r.kid)):
        assert authority.ring.active.kid == r.kid
        verify_api_token(token["token"], keys=keys, issuer=ISSUER, now=clock.now)
        assert kid in keys

    clock.now = r.verify_until + timedelta(seconds=1)
    keys = await key_set_keys(authority)
    assert set(keys) == {r.kid}
    with pytest.raises(Rejected) as e:  # not expired itself: its key no longer verifies
        verify_api_token(minted["token"], keys=keys, issuer=ISSUER, now=clock.now)
    assert e.value.reason is Reason.UNKNOWN_KID


def _call(ring: KeyRing, identity: WorkerIdentity, clock, *, build_id: int = 7
          ) -> dict[str, object]:
    token, _ = mint_build_token(ring, issuer=ISSUER, build_id=build_id, worker="a",
                                jkt=identity.thumbprint, timeout_s=600, grace_s=60,
                                now=clock.now)
    reports = [("step.update", {"number": 1})]
    return {"build_id": build_id, "token": token, "reports_digest": reports_hash(reports),
            "worker_sign_key": identity.sign_public_key,
            "proof": make_proof(identity, token=token, reports=reports, build_id=build_id,
                                now=clock.now)}


async def test_an_unknown_kid_reloads_at_most_once_per_period(engine, master_key, clock,
                                                              worker_a):
    store = Store(engine, master_key)
    authority = await Authority.load(store, settings(), master_key, clock=lambda: clock.now)
    loads = authority.keys.loads
    # Another server on this database switched to a key of its own at once.
    ring = await load_or_create_keyring(store, purpose=PURPOSE_TOKEN, master_key=master_key,
                                        now=clock.now)
    switched = await rotate_keyring(store, ring, master_key=master_key, now=clock.now,
                                    verify_until=clock.now + timedelta(days=1))
    clock.advance(1)
    claims = await authority.verify(**_call(switched, worker_a, clock))
    assert claims.build_id == 7 and authority.keys.loads == loads + 1

    for _ in range(5):  # forged kids: refused as before, the database asked no more
        with pytest.raises(Rejected) as e:
            await authority.verify(**_call(KeyRing.generate(clock.now), worker_a, clock))
        assert e.value.reason is Reason.UNKNOWN_KID
    assert authority.keys.loads == loads + 1
    clock.advance(PERIOD)
    await authority.keys.current()  # a period old: reloaded before use, as any holder
    assert authority.keys.loads == loads + 2
    for _ in range(5):  # a period later, the first unknown kid may ask once more
        with pytest.raises(Rejected):
            await authority.verify(**_call(KeyRing.generate(clock.now), worker_a, clock))
    assert authority.keys.loads == loads + 3


async def test_reloads_asked_together_share_one_load(clock):
    ring = KeyRing.generate(clock.now)
    gate = asyncio.Event()
    loads = []

    async def load() -> KeyRing:
        loads.append(clock.now)
        await gate.wait()
        return ring

    holder = RingHolder(load, ring, period_s=PERIOD, clock=lambda: clock.now)
    asked = [asyncio.create_task(holder.reload_unknown()) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*asked) == [True] * 10 and len(loads) == 1
    assert await holder.reload_unknown() is False  # within the period
    clock.advance(PERIOD)
    await holder.current()  # a period old: reloaded before use
    assert len(loads) == 2


async def test_a_failed_reload_keeps_the_keys_and_waits_a_period(clock):
    ring = KeyRing.generate(clock.now)
    calls = []

    async def load() -> KeyRing:
        calls.append(clock.now)
        raise OSError("database down")

    holder = RingHolder(load, ring, period_s=PERIOD, clock=lambda: clock.now)
    clock.advance(PERIOD)
    assert (await holder.current()).active.kid == ring.active.kid
    assert await holder.reload_unknown() is False  # failed: still refused, no retry storm
    await holder.current()
    assert len(calls) == 2


async def test_a_load_that_hangs_keeps_the_keys_and_does_not_hold_their_users(clock):
    """A reload that never answers (a database that stopped answering, a server that does
    not reply) counts as failed once it is a period old: its callers go on with the keys
    they have, and a period later it is tried afresh instead of waited on for ever."""
    from vela.reloading import Reloading

    hung = asyncio.Event()  # never set
    calls = []

    async def load() -> str:
        calls.append(clock.now)
        if len(calls) == 1:
            await hung.wait()
        return "new"

    keys = Reloading(load, "old", period_s=PERIOD, clock=lambda: clock.now, timeout_s=0.05)
    clock.advance(PERIOD)
    assert await asyncio.wait_for(keys.fresh(), 5) == "old"
    assert await asyncio.wait_for(keys.fresh(), 5) == "old" and len(calls) == 1
    clock.advance(PERIOD)  # the source answers again: the next reload gets through
    assert await asyncio.wait_for(keys.fresh(), 5) == "new" and len(calls) == 2


async def test_the_api_refuses_a_cut_off_keys_tokens_from_its_verify_until(
        engine, master_key, clock):
    """`vela keys rotate --verify-for 0` after a compromise: every API token of the old
    key dies at the switch (docs/security.md), also at an API that fetched the keys
    before it and keeps them a while."""
    from types import SimpleNamespace

    from vela.api.auth import Authenticator
    from vela.api.backend import ServerBackend
    from vela.api.errors import ApiError

    store = Store(engine, master_key)
    s = settings()
    authority = await Authority.load(store, s, master_key, clock=lambda: clock.now)
    backend = ServerBackend(scheduler=SimpleNamespace(store=store, builds=None),  # type: ignore[arg-type]
                            issuer=authority, settings=s)
    api = Authenticator(backend.token_keys, clock=lambda: clock.now,
                        monotonic=lambda: clock.now.timestamp())
    minted = await authority.mint_api_token(subject="ci", scopes=["builds:read"],
                                            ttl_s=24 * 3600)
    [r] = await rotate_keys(store, s, master_key, purposes=[PURPOSE_TOKEN], now=clock.now,
                            verify_for=timedelta(0))
    clock.now = r.switch_at - timedelta(seconds=1)
    assert (await api.authenticate(minted["token"])).sub == "ci"  # keys fetched now

    clock.now = r.switch_at + timedelta(seconds=1)
    with pytest.raises(ApiError) as e:
        await api.authenticate(minted["token"])
    assert e.value.status == 401
    fresh = await authority.mint_api_token(subject="ci", scopes=["builds:read"], ttl_s=600)
    assert (await api.authenticate(fresh["token"])).sub == "ci"


async def test_a_rotation_cut_short_cuts_every_old_key_not_only_the_one_it_retires(
        engine, master_key, clock):
    """docs/security.md, after a compromise: `vela keys rotate --verify-for 0` and
    every API token dies at the switch. A key retired by an earlier rotation still
    verifies (a year by default) and sits in the same ring, the same table, under the
    same master key as the compromised one: it must stop too."""
    store = Store(engine, master_key)
    s = settings()
    authority = await Authority.load(store, s, master_key, clock=lambda: clock.now)
    oldest = await authority.mint_api_token(subject="ci", scopes=["builds:read"],
                                            ttl_s=30 * 24 * 3600)
    [first] = await rotate_keys(store, s, master_key, purposes=[PURPOSE_TOKEN],
                                now=clock.now)
    clock.now = first.switch_at + timedelta(days=1)
    recent = await authority.mint_api_token(subject="ci", scopes=["builds:read"],
                                            ttl_s=30 * 24 * 3600)
    [cut] = await rotate_keys(store, s, master_key, purposes=[PURPOSE_TOKEN],
                              now=clock.now, verify_for=timedelta(0))
    clock.now = cut.switch_at + timedelta(seconds=1)
    keys = await key_set_keys(authority)
    assert set(keys) == {cut.kid}
    for minted in (oldest, recent):
        with pytest.raises(Rejected) as e:
            verify_api_token(minted["token"], keys=keys, issuer=ISSUER, now=clock.now)
        assert e.value.reason is Reason.UNKNOWN_KID
    infos = {k.kid: k for k in await list_keys(store, now=clock.now)}
    assert infos[first.retired[0]].verify_until == cut.switch_at
    assert cut.cut == [first.retired[0]]
