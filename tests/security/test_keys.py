"""Server signing keys: encrypted at rest, kept across restarts, rotated."""

from __future__ import annotations

import pickle
from datetime import timedelta

import pytest

from vela.db.store import Store
from vela.security import (
    PURPOSE_TOKEN,
    KeyRing,
    load_or_create_keyring,
    mint_build_token,
    rotate_keyring,
    verify_build_token,
)
from vela.security.atrest import DecryptionFailed
from vela.security.keys import decrypt_private, encrypt_private

from .conftest import ISSUER


async def _restart_keeps_tokens_valid(store, master_key, clock, worker_a):
    ring = await load_or_create_keyring(store, purpose=PURPOSE_TOKEN, master_key=master_key,
                                        now=clock.now)
    token, _ = mint_build_token(ring, issuer=ISSUER, build_id=1, worker="a",
                                jkt=worker_a.thumbprint, timeout_s=600, grace_s=60,
                                now=clock.now)
    again = await load_or_create_keyring(store, purpose=PURPOSE_TOKEN, master_key=master_key,
                                         now=clock.now)
    assert again.active.kid == ring.active.kid and len(again.keys) == 1
    verify_build_token(token, keys=again.verifying_keys(clock.now), issuer=ISSUER, now=clock.now)

    rotated = await rotate_keyring(store, again, master_key=master_key, now=clock.now,
                                   verify_until=clock.now + timedelta(seconds=660))
    reloaded = await load_or_create_keyring(store, purpose=PURPOSE_TOKEN,
                                            master_key=master_key, now=clock.now)
    assert reloaded.active.kid == rotated.active.kid != ring.active.kid
    verify_build_token(token, keys=reloaded.verifying_keys(clock.now), issuer=ISSUER,
                       now=clock.now)
    clock.advance(661)
    later = await load_or_create_keyring(store, purpose=PURPOSE_TOKEN, master_key=master_key,
                                         now=clock.now)
    assert set(later.verifying_keys(clock.now)) == {rotated.active.kid}

    with pytest.raises(DecryptionFailed):
        await load_or_create_keyring(store, purpose=PURPOSE_TOKEN, master_key=bytes(32),
                                     now=clock.now)


async def test_keyring_persists_and_rotates_in_memory(fake_store, master_key, clock, worker_a):
    await _restart_keeps_tokens_valid(fake_store, master_key, clock, worker_a)
    assert all(worker_a.thumbprint.encode() not in k.private_enc
               for k in fake_store.keys.values())


async def test_keyring_persists_and_rotates_on_database(engine, master_key, clock, worker_a):
    await _restart_keeps_tokens_valid(Store(engine, master_key), master_key, clock, worker_a)


def test_private_key_bound_to_kid_and_purpose(ring, master_key):
    key = ring.active
    blob = encrypt_private(key, master_key, "token")
    assert decrypt_private(kid=key.kid, purpose="token", private_enc=blob,
                           public_key=key.public_key, master_key=master_key,
                           created_at=key.created_at).public_key == key.public_key
    for kid, purpose in ((key.kid, "queue"), ("x" * 43, "token")):
        with pytest.raises(DecryptionFailed):
            decrypt_private(kid=kid, purpose=purpose, private_enc=blob,
                            public_key=key.public_key, master_key=master_key,
                            created_at=key.created_at)


def test_server_keys_never_show_or_travel(ring):
    assert "KeyRing(token" in repr(ring) and "_private" not in repr(ring.active)
    with pytest.raises(TypeError):
        pickle.dumps(ring)
    with pytest.raises(TypeError):
        pickle.dumps(ring.active)


def test_two_active_keys_newest_signs(clock):
    a = KeyRing.generate(clock.now)
    b = KeyRing.generate(clock.now + timedelta(seconds=1))
    both = KeyRing([*a.keys, *b.keys])
    assert both.active.kid == b.active.kid and len(both.verifying_keys(clock.now)) == 2
