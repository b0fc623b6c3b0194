"""`vela keys rotate` on a running control plane with a worker: no restart, and the
next build runs with the new token key (its package signed by it, which the worker
pinned after fetching the new key set) and a queue item signed by the new queue key."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from tests.ray.conftest import add_worker, ray_settings, run_build, wait_terminal, wait_until
from tests.server.conftest import pipeline
from vela.security import load_pinned_server
from vela.security.keys import PURPOSE_QUEUE, PURPOSE_TOKEN
from vela.server.context import ServerContext
from vela.server.keys import Rotation, list_keys, rotate_keys

pytestmark = pytest.mark.ray


@pytest.fixture
def settings(tmp_path, cluster):
    # Short reload periods: the new keys take over a second after the rotation.
    return ray_settings(tmp_path, tokens={"key_reload_s": 0.5})


def rotate(settings) -> list[Rotation]:
    """What `vela keys rotate` does, from this process, on the server's database."""
    async def go() -> list[Rotation]:
        ctx = ServerContext.open(settings)
        try:
            return await rotate_keys(ctx.store, settings, ctx.master_key,
                                     purposes=[PURPOSE_TOKEN, PURPOSE_QUEUE],
                                     now=datetime.now(UTC))
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
