"""Both server keys rotated on a running mixed fleet (no Ray, no restart): a build
queued before the rotation and builds queued after it run on a server-mode worker
(which fetches the new token key set when it first meets the new key) and on a legacy
worker (which asks the gateway for the queue keys again); nothing is dead-lettered.
SQLite + database queue, PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from tests.legacy.conftest import fleet_settings, open_fleet
from tests.server.conftest import pipeline
from vela.domain import BuildStatus
from vela.security.keys import PURPOSE_QUEUE, PURPOSE_TOKEN
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
