"""The queue key rotated on a running system: the Scheduler's BuildQueue signs with the
new key once it takes over, the listener verifies it (and the old one's items still
queued), and forged kids are dead-lettered without reloading the keys more than once a
period. On SQLite and PostgreSQL (the database queue, in the keys' own database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.queue.conftest import ROUTES, FakeClock, FakeScheduler, signed
from vela.config import Settings
from vela.db.store import Store
from vela.errors import VelaError
from vela.queue import ItemSigner, ItemVerifier
from vela.queue.db_queue import DatabaseQueue
from vela.queue.listener import Listener, Step
from vela.security import load_or_create_keyring, rotate_keyring
from vela.security.keys import PURPOSE_QUEUE, RingHolder
from vela.server.builds import MAX_BUILD_TIMEOUT_S, BuildQueue
from vela.server.context import ServerContext
from vela.server.keys import rotate_keys

PERIOD = 30.0
PIPELINE = 'version: "1"\nsteps:\n  - name: a\n    commands: ["true"]\n'


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def settings() -> Settings:
    return Settings.model_validate({"queue": {"routes": list(ROUTES)},
                                    "tokens": {"key_reload_s": PERIOD}})


async def keys(ctx: ServerContext, clock: Clock) -> RingHolder:
    return await ctx.keys(PURPOSE_QUEUE, clock=clock)


def listener(queue, holder: RingHolder, scheduler: FakeScheduler) -> Listener:
    # No keys of its own: it takes the holder's on each pass.
    return Listener(queue, ItemVerifier({}, ROUTES, 4096), scheduler, lease_s=60,
                    reserve_timeout_s=0, batch=16, clock=FakeClock(), keys=holder)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ctx(engine, master_key) -> ServerContext:
    return ServerContext(settings=settings(), engine=engine, store=Store(engine, master_key),
                         master_key=master_key)


@pytest.fixture
def queue(engine) -> DatabaseQueue:
    return DatabaseQueue(engine)


async def test_items_signed_before_and_after_a_rotation_are_both_dispatched(
        ctx, queue, clock, master_key):
    scheduler_keys, listener_keys = await keys(ctx, clock), await keys(ctx, clock)
    builds = BuildQueue(ctx.store, queue, ItemSigner.from_key(scheduler_keys.ring.active),
                        ROUTES, keys=scheduler_keys)
    old = builds.signer.kid
    first = await builds.create("acme/app", PIPELINE)

    [r] = await rotate_keys(ctx.store, ctx.settings, master_key, purposes=[PURPOSE_QUEUE],
                            now=clock.now)
    clock.advance(PERIOD)
    early = await builds.create("acme/app", PIPELINE)
    assert builds.signer.kid == old  # published, not signing yet
    clock.advance(PERIOD + 1)
    second = await builds.create("acme/app", PIPELINE)
    assert builds.signer.kid == r.kid

    fake = FakeScheduler()
    for b in (first, early, second):
        fake.add(b.id)
    loads = listener_keys.loads
    steps = await listener(queue, listener_keys, fake).run_until_idle()
    assert Step.DEAD_LETTERED not in steps
    assert sorted(fake.dispatched) == [first.id, early.id, second.id]
    assert listener_keys.loads == loads + 1  # its periodic reload; no unknown kid met


async def test_a_key_that_signs_at_once_costs_one_reload_and_forged_kids_none(
        ctx, queue, clock, master_key):
    holder = await keys(ctx, clock)
    # Another server process switched to a new queue key without publishing it first.
    ring = await load_or_create_keyring(ctx.store, purpose=PURPOSE_QUEUE,
                                        master_key=master_key, now=clock.now)
    switched = await rotate_keyring(ctx.store, ring, master_key=master_key, now=clock.now,
                                    verify_until=clock.now + timedelta(days=1))
    clock.advance(1)
    fake = FakeScheduler()
    fake.add(1)
    await queue.push("vela", signed(ItemSigner.from_key(switched.active), 1))
    forgers = [ItemSigner(Ed25519PrivateKey.generate(), f"forged-{n}") for n in range(5)]
    for n, forger in enumerate(forgers, start=2):
        fake.add(n)
        await queue.push("vela", signed(forger, n))

    loads = holder.loads
    listen = listener(queue, holder, fake)
    await listen.run_until_idle()
    assert fake.dispatched == [1]
    assert holder.loads == loads + 1  # one reload, for the first unknown kid
    dead = await queue.dead_letters()
    assert sorted(json.loads(d.payload)["kid"] for d in dead) == sorted(
        f.kid for f in forgers)
    assert {d.reason for d in dead} == {"unknown_kid"}

    for n, forger in enumerate(forgers, start=10):  # more forgeries, same period
        await queue.push("vela", signed(forger, n))
    await listen.run_until_idle()
    assert holder.loads == loads + 1 and len(await queue.dead_letters()) == 10

    clock.advance(PERIOD)  # a period on: the keys reload, and one forged kid may ask again
    for n, forger in enumerate(forgers, start=20):
        await queue.push("vela", signed(forger, n))
    await listen.run_until_idle()
    assert holder.loads == loads + 3 and len(await queue.dead_letters()) == 15


async def test_a_builds_timeout_is_bounded_as_the_rotation_assumes(ctx, queue, clock):
    """A retired token key verifies for the longest build token: timeouts have a cap."""
    holder = await keys(ctx, clock)
    builds = BuildQueue(ctx.store, queue, ItemSigner.from_key(holder.ring.active), ROUTES,
                        keys=holder)
    for timeout_s in (0, MAX_BUILD_TIMEOUT_S + 1):
        with pytest.raises(VelaError, match="timeout"):
            await builds.create("acme/app", PIPELINE, timeout_s=timeout_s)
    build = await builds.create("acme/app", PIPELINE, timeout_s=MAX_BUILD_TIMEOUT_S)
    assert build.timeout_s == MAX_BUILD_TIMEOUT_S
