"""Pinned server keys: trust on first registration, then only endorsed rotations."""

from __future__ import annotations

import os
import stat
from datetime import timedelta

import pytest

from vela.security import (
    KeyRing,
    Reason,
    Rejected,
    load_pinned_server,
    open_package,
    pin_key_set,
    publish_key_set,
    save_pinned_server,
)

from .test_package import make


def rejected(reason, fn, *args, **kwargs):
    with pytest.raises(Rejected) as e:
        fn(*args, **kwargs)
    assert e.value.reason is reason, e.value


def test_rotation_followed_through_an_endorsed_key_set(ring, clock, worker_a, tmp_path):
    pinned = pin_key_set(publish_key_set(ring, server_id="srv", now=clock.now).model_dump(),
                         pinned=None)
    save_pinned_server(tmp_path, pinned)
    assert stat.S_IMODE(os.stat(tmp_path / "server-keys.json").st_mode) == 0o600
    assert load_pinned_server(tmp_path) == pinned

    clock.advance(10)
    rotated = ring.rotated(now=clock.now, verify_until=clock.now + timedelta(hours=1))
    pkg = make(rotated, clock, to=worker_a)
    rejected(Reason.PACKAGE_UNKNOWN_SIGNER, open_package, pkg, identity=worker_a,
             pinned_server_keys=pinned.keys, hostname="a", now=clock.now)
    pinned = pin_key_set(publish_key_set(rotated, server_id="srv", now=clock.now),
                         pinned=pinned)
    assert set(pinned.keys) == {ring.active.kid, rotated.active.kid}
    open_package(pkg, identity=worker_a, pinned_server_keys=pinned.keys, hostname="a",
                 now=clock.now)


def test_key_set_from_a_stranger_rejected(ring, clock):
    pinned = pin_key_set(publish_key_set(ring, server_id="srv", now=clock.now), pinned=None)
    stranger = publish_key_set(KeyRing.generate(clock.now), server_id="srv",
                               now=clock.now + timedelta(seconds=1))
    rejected(Reason.KEY_SET_UNTRUSTED, pin_key_set, stranger, pinned=pinned)


def test_key_set_of_another_server_or_older_rejected(ring, clock):
    pinned = pin_key_set(publish_key_set(ring, server_id="srv", now=clock.now), pinned=None)
    rejected(Reason.WRONG_ISSUER, pin_key_set,
             publish_key_set(ring, server_id="other", now=clock.now), pinned=pinned)
    rejected(Reason.KEY_SET_UNTRUSTED, pin_key_set,
             publish_key_set(ring, server_id="srv", now=clock.now - timedelta(seconds=5)),
             pinned=pinned)


def test_key_set_with_a_smuggled_key_rejected(ring, clock):
    ks = publish_key_set(ring, server_id="srv", now=clock.now)
    extra = KeyRing.generate(clock.now).active
    smuggled = ks.model_copy(update={"keys": {**ks.keys, extra.kid: extra.public_key}})
    rejected(Reason.KEY_SET_UNTRUSTED, pin_key_set, smuggled, pinned=None)
    pinned = pin_key_set(ks, pinned=None)
    rejected(Reason.KEY_SET_UNTRUSTED, pin_key_set, smuggled.model_copy(
        update={"issued_at": ks.issued_at + 1}), pinned=pinned)
    mislabeled = ks.model_copy(update={"keys": {"not-the-thumbprint": ring.active.public_key}})
    rejected(Reason.MALFORMED, pin_key_set, mislabeled, pinned=None)
