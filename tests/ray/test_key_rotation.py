"""`vela keys rotate` on a running control plane with a worker: no restart, and the
next build runs with the new token key (its package signed by it, which the worker
pinned after fetching the new key set) and a queue item signed by the new queue key."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from tests.ray.conftest import add_worker, ray_settings, run_build, wait_terminal, wait_until
from tests.server.conftest import pipeline
from vela.security import load_pinned_server
from vela.security.keys import PURPOSE_QUEUE, PURPOSE_TOKEN
from vela.server.context import ServerContext
from vela.server.keys import Rotation, list_keys, rotate_keys

pytestmark = pytest.mark.ray


@pytest.fixture
def settings(request, tmp_path, cluster):
    # Short reload periods: the new keys take over a second after the rotation.
    sections = getattr(request, "param", {"tokens": {"key_reload_s": 0.5}})
    return ray_settings(tmp_path, **sections)


def rotate(settings, **kw) -> list[Rotation]:
    """What `vela keys rotate` does, from this process, on the server's database."""
    async def go() -> list[Rotation]:
        ctx = ServerContext.open(settings)
        try:
            return await rotate_keys(ctx.store, settings, ctx.master_key,
                                     purposes=[PURPOSE_TOKEN, PURPOSE_QUEUE],
                                     now=datetime.now(UTC), **kw)
        finally:
            await ctx.close()

    return asyncio.run(go())


def active_kids(settings) -> set[str]:
    async def go() -> set[str]:
        ctx = ServerContext.open(settings)
        try:
            return {k.kid for k in await list_keys(ctx.store, now=datetime.now(UTC))
                    if k.active}
        finally:
            await ctx.close()

    return asyncio.run(go())


def test_a_build_after_a_rotation_runs_with_the_new_keys(settings, server):
    add_worker(settings, server, "rot1")
    state_dir = settings.server.data_dir / "workers" / "rot1"
    first = run_build(server, pipeline("echo before"))
    assert wait_terminal(server, first)["status"] == "success"
    [old_token] = load_pinned_server(state_dir).keys

    token, queue = rotate(settings)
    wait_until(lambda: datetime.now(UTC) > token.switch_at, 30, "the keys' switch")
    assert active_kids(settings) == {token.kid, queue.kid}

    second = run_build(server, pipeline("echo after"))
    v = wait_terminal(server, second)
    assert v["status"] == "success", v
    # Its package came signed by the new key: the worker fetched the key set, which the
    # old key endorses, and pinned it; the old key stays (it verifies for a year).
    assert set(load_pinned_server(state_dir).keys) == {old_token, token.kid}


# The worker fetches the key set at most a reload period after it changed (5 s, as it
# checks in every 0.2 s), well before the switch, two periods after the rotation.
@pytest.mark.parametrize("settings", [{"tokens": {"key_reload_s": 5.0},
                                       "worker": {"checkin_period_s": 0.2}}],
                         indirect=True)
def test_a_worker_drops_a_cut_key_and_follows_the_new_one_with_no_build_in_between(
        settings, server):
    """`vela keys rotate --verify-for 0` (after a compromise): the worker learns the new
    key as it checks in, before the key signs, and drops the cut one, with no build
    between; the next build runs."""
    add_worker(settings, server, "rot2")
    state_dir = settings.server.data_dir / "workers" / "rot2"
    [old_token] = load_pinned_server(state_dir).keys

    token, _ = rotate(settings, verify_for=timedelta(0))
    wait_until(lambda: set(load_pinned_server(state_dir).keys) == {old_token, token.kid},
               30, "the new key pinned before it signs")
    assert datetime.now(UTC) < token.switch_at
    wait_until(lambda: set(load_pinned_server(state_dir).keys) == {token.kid}, 30,
               "the cut key dropped")
    build = run_build(server, pipeline("echo after the cut"))
    assert wait_terminal(server, build)["status"] == "success"
