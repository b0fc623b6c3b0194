"""Both server keys rotated on a running mixed fleet (no Ray, no restart): a build
queued before the rotation and builds queued after it run on a server-mode worker
(which fetches the new token key set when it first meets the new key) and on a legacy
worker (which asks the gateway for the queue keys again); nothing is dead-lettered.
SQLite + database queue, PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from tests.legacy.conftest import WORKER_SECRET, fleet_settings, open_fleet
from tests.server.conftest import pipeline
from vela.db.store import Store
from vela.domain import BuildStatus
from vela.executor import choose_runtime
from vela.legacy.gateway import LegacyGateway
from vela.legacy.worker import LegacyWorker, Poll
from vela.queue import ItemSigner
from vela.queue.db_queue import DatabaseQueue
from vela.security import KeyRing, load_or_create_keyring
from vela.security.keys import PURPOSE_QUEUE, PURPOSE_TOKEN, RingHolder
from vela.server.builds import BuildQueue
from vela.server.keys import rotate_keys

PERIOD = 0.05  # every use reloads the keys: the holders follow at once


@pytest.fixture
async def fleet(engine, tmp_path, master_key):
    settings = fleet_settings(tmp_path, routes=["vela", "gpu"], legacy_routes=["gpu"])
    settings.tokens.key_reload_s = PERIOD
    fleet = await open_fleet(engine, tmp_path, master_key, settings)
    try:
        yield fleet
    finally:
        await fleet.close()


async def until_switch(at: datetime, timeout_s: float = 10.0) -> None:
    """The rotation switches keys at a set instant of the wall clock: wait for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while datetime.now(UTC) <= at:
        assert loop.time() < deadline, "the switch did not come"
        await asyncio.sleep(0.01)


async def test_builds_run_on_both_kinds_of_worker_across_a_rotation(fleet):
    worker = await fleet.add_worker("w1")
    legacy = fleet.add_legacy_worker("old1", routes=("gpu",))
    old_token = fleet.authority.ring.active.kid
    before = [await fleet.submit(pipeline("echo before"), route=r) for r in ("vela", "gpu")]

    rotations = {r.purpose: r for r in await rotate_keys(
        fleet.store, fleet.settings, fleet.ctx.master_key,
        purposes=[PURPOSE_TOKEN, PURPOSE_QUEUE], now=datetime.now(UTC))}
    await until_switch(rotations[PURPOSE_TOKEN].switch_at)
    after = [await fleet.submit(pipeline("echo after"), route=r) for r in ("vela", "gpu")]
    assert fleet.scheduler.builds.signer.kid == rotations[PURPOSE_QUEUE].kid

    builds = await fleet.pump(before + after)
    assert {b: x.status for b, x in builds.items()} == dict.fromkeys(
        before + after, BuildStatus.SUCCESS.value)
    assert fleet.authority.ring.active.kid == rotations[PURPOSE_TOKEN].kid != old_token
    # The server-mode worker met the new token key and pinned it, the old one kept.
    assert set(worker._pinned) == {old_token, rotations[PURPOSE_TOKEN].kid}
    assert fleet.listener.stats.dead_lettered == {}
    assert legacy.status()["error"] is None
    assert await fleet.queue.dead_letters() == []


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def test_one_failed_gateway_reload_does_not_dead_letter_the_new_keys_items(
        engine, tmp_path, master_key):
    """The rotation rule allows a holder one failed reload. The gateway's failed
    while the rotation waited for its switch; once the database is back, a legacy worker
    that meets the new queue key asks the gateway again, and the gateway must reload
    then (as the listener does on an unknown kid) instead of answering the keys it
    cached before: else the item is dead-lettered and its build waits for ever."""
    period = 30.0
    clock = Clock()
    settings = fleet_settings(tmp_path, routes=["vela", "gpu"], legacy_routes=["gpu"])
    settings.tokens.key_reload_s = period
    store = Store(engine, master_key)
    queue = DatabaseQueue(engine)
    down = False

    async def load() -> KeyRing:
        if down:
            raise OSError("the database does not answer")
        return await load_or_create_keyring(store, purpose=PURPOSE_QUEUE,
                                            master_key=master_key, now=clock())

    gateway_keys = RingHolder(load, await load(), period_s=period, clock=clock)
    gateway = LegacyGateway(store=store, settings=settings, now=clock,
                            queue_keys=gateway_keys.verifying_keys,
                            reload_queue_keys=gateway_keys.reload_unknown)
    scheduler_keys = await RingHolder.open(store, purpose=PURPOSE_QUEUE,
                                           master_key=master_key, period_s=period,
                                           clock=clock)
    builds = BuildQueue(store, queue, ItemSigner.from_key(scheduler_keys.ring.active),
                        settings.queue.routes, keys=scheduler_keys)
    worker = LegacyWorker(
        hostname="old1", routes=["gpu"], build_limit=1,
        runtime=choose_runtime(allow_unsandboxed=False, network=False),
        workspace_root=tmp_path / "legacy", server=gateway, queue=queue,
        worker_secret=WORKER_SECRET, reserve_timeout_s=0, clock=clock, flush_s=0.05,
        report_retry_s=0.01, report_deadline_s=5.0, key_reload_s=period)
    try:
        assert await worker.poll_once() is Poll.IDLE  # hello: the queue keys
        [r] = await rotate_keys(store, settings, master_key, purposes=[PURPOSE_QUEUE],
                                now=clock())
        clock.advance(period + 10)
        down = True  # the gateway's reload fails: it keeps, and hands out, the old keys
        assert await worker.poll_once() is Poll.IDLE
        down = False
        clock.now = r.switch_at + timedelta(seconds=1)
        build = await builds.create("acme/app", pipeline("echo after"), route="gpu")
        assert builds.signer.kid == r.kid
        assert await worker.poll_once() is Poll.STARTED
        assert await queue.dead_letters() == []
        assert (await store.get_build(build.id)).status == BuildStatus.RUNNING.value
    finally:
        await worker.close()
