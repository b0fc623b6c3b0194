"""A worker follows a rotation of the server's token key: on ``package_unknown_signer``
it fetches the server's key set, pins it only if a key it pins already endorses it, and
tries the package once more. A key set nobody it trusts endorses is refused, and so is
the package. In plain asyncio, with the same fake server as test_core."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.worker.test_core import HOST, ISSUER, Clock, FakeServer, one_step
from vela.executor import LocalRuntime
from vela.security import KeyRing, WorkerIdentity, load_pinned_server, publish_key_set
from vela.security.pinning import ServerKeySet
from vela.worker import WorkerCore
from vela.worker.server_keys import ServerKeys

PERIOD = 30.0


class KeySetSource:
    """The server's ``key_set`` as the worker's link fetches it; counts the fetches."""

    def __init__(self, server: FakeServer, clock: Clock) -> None:
        self.server = server
        self.clock = clock
        self.fetches = 0
        self.answer: Any = None  # a key set to hand out instead of the server's own
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> Any:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.answer is not None:
            return self.answer
        return publish_key_set(self.server.ring, server_id=ISSUER,
                               now=self.clock()).model_dump(mode="json")


@dataclass
class World:
    clock: Clock
    server: FakeServer
    source: KeySetSource
    server_keys: ServerKeys
    core: WorkerCore
    state_dir: Path


@pytest.fixture
async def world(tmp_path):
    clock = Clock()
    identity = WorkerIdentity.generate()
    server = FakeServer(KeyRing.generate(clock() - timedelta(days=1)), identity, clock)
    source = KeySetSource(server, clock)
    state_dir = tmp_path / "state"
    server_keys = ServerKeys(state_dir, fetch=source, period_s=PERIOD, clock=clock)
    server_keys.pin(publish_key_set(server.ring, server_id=ISSUER, now=clock()))  # registered
    core = WorkerCore(hostname=HOST, routes=["vela"], build_limit=4, identity=identity,
                      pinned_server_keys=server_keys.keys, runtime=LocalRuntime(),
                      server=server, workspace_root=tmp_path / "ws", clock=clock,
                      flush_s=0.02, report_retry_s=0.005, report_deadline_s=5.0,
                      refresh_server_keys=server_keys.refresh)
    yield World(clock, server, source, server_keys, core, state_dir)
    await core.close()


def rotate(server: FakeServer, clock: Clock) -> tuple[str, str]:
    """The server switches to a new key at once; the old one verifies a day more."""
    old = server.ring.active.kid
    server.ring = server.ring.rotated(now=clock(), verify_until=clock() + timedelta(days=1))
    return old, server.ring.active.kid


async def test_an_endorsed_new_key_set_is_pinned_and_the_package_opened(world):
    core, server, source = world.core, world.server, world.source
    old, new = rotate(server, world.clock)
    receipt = await server.execute(core, server.package(1, one_step("echo rotated")))
    assert receipt.accepted, receipt
    await server.until(lambda: server.finish(1))
    assert server.finish(1)["status"] == "success"
    assert source.fetches == 1
    assert set(world.server_keys.keys) == {old, new}
    assert set(load_pinned_server(world.state_dir).keys) == {old, new}  # kept on disk
    # Known now: the next package needs no fetch.
    assert (await server.execute(core, server.package(2, one_step("true")))).accepted
    assert source.fetches == 1


@pytest.mark.parametrize("forgery", ["stranger", "pinned_key_unsigned", "older"])
async def test_a_key_set_no_pinned_key_endorses_is_refused_and_the_package_too(
        world, forgery):
    """Security: whoever can hand the worker packages and a key set (a rogue server
    on the worker's link) cannot make it trust a key of their own."""
    core, server, source, clock = world.core, world.server, world.source, world.clock
    pinned_before = load_pinned_server(world.state_dir)
    honest_kid = server.ring.active.kid
    rogue = KeyRing.generate(clock())
    if forgery == "stranger":  # its own keys, all of them signing: fine at registration
        source.answer = publish_key_set(rogue, server_id=ISSUER, now=clock())
    elif forgery == "pinned_key_unsigned":  # names the pinned key, cannot sign with it
        forged = publish_key_set(rogue, server_id=ISSUER, now=clock())
        keys = {**forged.keys, honest_kid: server.ring.active.public_key}
        unsigned = ServerKeySet(server_id=ISSUER, keys=keys, issued_at=forged.issued_at,
                                signatures={})
        source.answer = unsigned.model_copy(update={"signatures": {
            **forged.signatures, honest_kid: forged.signatures[rogue.active.kid]}})
    else:  # a genuine set, but older than the pinned one (a replay after a rotation)
        source.answer = publish_key_set(server.ring, server_id=ISSUER,
                                        now=clock() - timedelta(hours=1))
        server.ring = rogue
    if forgery != "older":
        server.ring = rogue  # the packages come signed by the rogue key
    if hasattr(source.answer, "model_dump"):
        source.answer = source.answer.model_dump(mode="json")

    receipt = await server.execute(core, server.package(1, one_step("echo pwned")))
    assert (receipt.accepted, receipt.reason) == (False, "package_unknown_signer")
    assert source.fetches == 1 and core.running == []
    assert world.server_keys.pinned == pinned_before
    assert load_pinned_server(world.state_dir) == pinned_before


async def test_refusals_fetch_once_per_period_and_together_once(world):
    core, server, source, clock = world.core, world.server, world.source, world.clock
    rogue = KeyRing.generate(clock())
    source.answer = publish_key_set(rogue, server_id=ISSUER, now=clock()).model_dump(
        mode="json")
    server.ring = rogue
    source.gate = asyncio.Event()
    refused = [asyncio.create_task(server.execute(core, server.package(n, one_step("true"))))
               for n in range(1, 4)]
    await asyncio.sleep(0)
    source.gate.set()
    receipts = await asyncio.gather(*refused)
    assert {r.reason for r in receipts} == {"package_unknown_signer"}
    assert source.fetches == 1  # refused together: one fetch
    for n in range(4, 8):
        await server.execute(core, server.package(n, one_step("true")))
    assert source.fetches == 1  # within the period: none
    clock.advance(PERIOD)
    await server.execute(core, server.package(9, one_step("true")))
    assert source.fetches == 2


async def test_a_package_that_comes_as_the_fetch_ends_is_opened_too(world):
    """Another package of the new key, refused after the fetch pinned the new set but
    before the refusal that asked for it pinned it in the core: it must not be refused
    as if nothing new had come (the fetch it would need is a period away)."""
    core, server, source = world.core, world.server, world.source
    old, new = rotate(server, world.clock)
    late: list[asyncio.Task[Any]] = []

    async def fetch() -> Any:
        answer = await source()
        # Called while this fetch completes: its answer reaches the first refusal later.
        late.append(asyncio.create_task(
            server.execute(core, server.package(2, one_step("true")))))
        return answer

    world.server_keys._fetch = fetch
    first = await server.execute(core, server.package(1, one_step("true")))
    second = await late[0]
    assert first.accepted, first
    assert second.accepted, second
    assert source.fetches == 1 and set(world.server_keys.keys) == {old, new}


async def test_a_key_the_server_cut_is_dropped_a_period_later_without_any_refusal(world):
    """The worker follows the server's key set as it checks in: once the server no
    longer publishes a key (cut by `vela keys rotate --verify-for 0`, or past its
    verify_until), a package signed by it is refused here within a period, even though
    no package of the new key ever came to make the worker fetch."""
    core, server, source, clock = world.core, world.server, world.source, world.clock
    before = server.ring
    # Published first, as `vela keys rotate` does: the new key verifies at once.
    server.ring = before.rotated(now=clock(), verify_until=clock() + timedelta(seconds=60),
                                 switch_at=clock() + timedelta(seconds=60))
    assert await world.server_keys.follow() is not None
    assert source.fetches == 0  # not a period yet: nothing fetched
    clock.advance(PERIOD)
    keys = await world.server_keys.follow()
    assert source.fetches == 1 and set(keys) == set(server.ring.verifying_keys(clock()))
    core.pin(keys)
    clock.advance(120)  # the switch, then the old key's verify_until: cut
    server.ring = KeyRing(server.ring.keys, purpose=before.purpose, now=clock())
    new_kid = server.ring.newest_since(before).kid
    assert server.ring.active.kid == new_kid
    assert set(server.ring.verifying_keys(clock())) == {new_kid}
    core.pin(await world.server_keys.follow())
    assert source.fetches == 2 and set(world.server_keys.keys) == {new_kid}
    assert set(load_pinned_server(world.state_dir).keys) == {new_kid}

    newer = server.ring
    server.ring = before  # someone who kept the cut key signs a package with it
    forged = server.package(1, one_step("echo cut key"))
    server.ring = newer
    receipt = await server.execute(core, forged)
    assert not receipt.accepted and receipt.reason == "package_unknown_signer", receipt
    # The new key's packages open with no fetch: it was known before it signed.
    assert (await server.execute(core, server.package(2, one_step("true")))).accepted
    assert source.fetches == 3  # the refusal's own fetch, which changed nothing


async def test_a_periodic_key_set_no_pinned_key_endorses_changes_nothing(world):
    source, clock = world.source, world.clock
    pinned = world.server_keys.keys
    source.answer = publish_key_set(KeyRing.generate(clock()), server_id=ISSUER,
                                    now=clock()).model_dump(mode="json")
    clock.advance(PERIOD)
    assert await world.server_keys.follow() == pinned
    assert source.fetches == 1 and load_pinned_server(world.state_dir).keys == pinned


async def test_following_an_unchanged_key_set_logs_nothing(world, caplog):
    """Every worker fetches the key set once a period: one that changed nothing is not
    worth a log line each time (it is when the keys change)."""
    clock = world.clock
    with caplog.at_level(logging.INFO, logger="vela.worker"):
        for _ in range(3):
            clock.advance(PERIOD)
            await world.server_keys.follow()
    assert world.source.fetches == 3
    assert not [r for r in caplog.records if "pinned" in r.getMessage()]
