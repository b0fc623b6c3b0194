"""The queue contract, on fakeredis, real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from tests.queue.conftest import on_all_backends
from vela.errors import NotFound
from vela.queue import Queue, QueueError, RouteDepth, Settlement

pytestmark = on_all_backends

LEASE = 30.0


async def test_push_reserve_ack(queue: Queue, clock):
    item_id = await queue.push("vela", b"one")
    assert isinstance(item_id, str)
    assert await queue.depth() == {"vela": RouteDepth(ready=1)}

    res = await queue.reserve(["vela"], lease_s=LEASE)
    assert res is not None
    assert (res.id, res.route, res.payload, res.deliveries) == (item_id, "vela", b"one", 1)
    assert res.deadline == pytest.approx(clock() + LEASE)
    assert res.lease_id
    assert await queue.depth() == {"vela": RouteDepth(in_flight=1)}

    assert await queue.ack(res) is True
    assert await queue.ack(res) is False, "a second ack must do nothing"
    assert await queue.depth() == {}
    assert await queue.reserve(["vela"], lease_s=LEASE) is None


async def test_fifo_per_route_and_route_priority(queue: Queue):
    for payload in (b"v1", b"v2"):
        await queue.push("vela", payload)
    await queue.push("gpu", b"g1")

    got = []
    while (res := await queue.reserve(["gpu", "vela"], lease_s=LEASE)) is not None:
        got.append(res.payload)
        assert await queue.ack(res)
    assert got == [b"g1", b"v1", b"v2"]


async def test_reserve_only_from_the_routes_asked(queue: Queue):
    await queue.push("gpu", b"g")
    assert await queue.reserve(["vela"], lease_s=LEASE) is None
    assert await queue.depth() == {"gpu": RouteDepth(ready=1)}


async def test_payload_bytes_round_trip(queue: Queue):
    payload = bytes(range(256)) * 4
    await queue.push("vela", payload)
    res = await queue.reserve(["vela"], lease_s=LEASE)
    assert res is not None and res.payload == payload


async def test_release_puts_item_back_at_head_without_counting_a_delivery(queue: Queue):
    first = await queue.push("vela", b"a")
    await queue.push("vela", b"b")
    res = await queue.reserve(["vela"], lease_s=LEASE)
    assert res is not None and res.id == first
    assert await queue.release(res) is True
    assert await queue.release(res) is False
    assert await queue.ack(res) is False, "a released lease is no longer current"

    again = await queue.reserve(["vela"], lease_s=LEASE)
    assert again is not None
    assert (again.id, again.deliveries) == (first, 1)
    assert again.lease_id != res.lease_id


async def test_a_reclaimed_batch_keeps_its_order(queue: Queue, clock):
    """A listener pass leases its batch with one deadline; after a crash the batch comes
    back first in first out, not reversed."""
    ids = [await queue.push("vela", b"%d" % i) for i in range(3)]
    assert [r.id for r in await queue.reserve_many(["vela"], 3, lease_s=LEASE)] == ids
    clock.advance(LEASE)
    assert await queue.reclaim_expired() == 3
    assert [r.id for r in await queue.reserve_many(["vela"], 3, lease_s=LEASE)] == ids


async def test_expired_lease_is_reclaimed_to_the_head_and_redelivered(queue: Queue, clock):
    first = await queue.push("vela", b"a")
    await queue.push("vela", b"b")
    crashed = await queue.reserve(["vela"], lease_s=LEASE)
    assert crashed is not None and crashed.id == first

    clock.advance(LEASE - 1)
    assert await queue.reclaim_expired() == 0
    clock.advance(1)
    assert await queue.reclaim_expired() == 1
    assert await queue.reclaim_expired() == 0
    assert await queue.depth() == {"vela": RouteDepth(ready=2)}

    redelivered = await queue.reserve(["vela"], lease_s=LEASE)
    assert redelivered is not None
    assert (redelivered.id, redelivered.payload, redelivered.deliveries) == (first, b"a", 2)

    # The crashed consumer wakes up: none of its settlements may touch the item.
    assert await queue.ack(crashed) is False
    assert await queue.release(crashed) is False
    assert await queue.dead_letter(crashed, "late", "") is False
    assert await queue.depth() == {"vela": RouteDepth(ready=1, in_flight=1)}
    assert await queue.ack(redelivered) is True


async def test_stale_lease_after_reclaim_does_nothing_even_before_redelivery(queue: Queue, clock):
    await queue.push("vela", b"a")
    res = await queue.reserve(["vela"], lease_s=LEASE)
    clock.advance(LEASE + 1)
    assert await queue.reclaim_expired() == 1
    assert await queue.ack(res) is False
    assert await queue.depth() == {"vela": RouteDepth(ready=1)}


async def test_an_expired_but_unreclaimed_lease_can_still_settle(queue: Queue, clock):
    await queue.push("vela", b"a")
    res = await queue.reserve(["vela"], lease_s=LEASE)
    clock.advance(LEASE + 5)
    # Nobody else has the item yet, so acking is safe and saves a redelivery.
    assert await queue.ack(res) is True
    assert await queue.reclaim_expired() == 0


async def test_reclaim_with_explicit_now(queue: Queue, clock):
    await queue.push("vela", b"a")
    await queue.reserve(["vela"], lease_s=LEASE)
    assert await queue.reclaim_expired(now=clock() + LEASE / 2) == 0
    assert await queue.reclaim_expired(now=clock() + LEASE) == 1


async def test_dead_letter_list_and_requeue(queue: Queue, clock):
    item_id = await queue.push("gpu", b"bad")
    res = await queue.reserve(["gpu"], lease_s=LEASE)
    clock.advance(3)
    assert await queue.dead_letter(res, "bad_signature", "signature does not match") is True
    assert await queue.dead_letter(res, "bad_signature", "") is False
    assert await queue.depth() == {"gpu": RouteDepth(dead=1)}
    assert await queue.reserve(["gpu"], lease_s=LEASE) is None
    assert await queue.reclaim_expired(now=clock() + 10 * LEASE) == 0

    [dead] = await queue.dead_letters()
    assert (dead.id, dead.route, dead.payload) == (item_id, "gpu", b"bad")
    assert (dead.reason, dead.detail) == ("bad_signature", "signature does not match")
    assert dead.dead_at == pytest.approx(clock())
    assert dead.deliveries == 1

    new_id = await queue.requeue(item_id)
    assert new_id != item_id
    assert await queue.dead_letters() == []
    assert await queue.depth() == {"gpu": RouteDepth(ready=1)}
    res = await queue.reserve(["gpu"], lease_s=LEASE)
    assert (res.id, res.payload, res.deliveries) == (new_id, b"bad", 1)

    with pytest.raises(NotFound):
        await queue.requeue(item_id)
    with pytest.raises(NotFound):
        await queue.requeue(res.id)  # leased, not dead
    with pytest.raises(NotFound):
        await queue.requeue("no-such-id")


async def test_dead_letters_newest_first_with_limit(queue: Queue, clock):
    ids = []
    for i, route in enumerate(["vela", "gpu", "vela"]):
        await queue.push(route, f"p{i}".encode())
        res = await queue.reserve([route], lease_s=LEASE)
        clock.advance(1)
        assert await queue.dead_letter(res, f"r{i}")
        ids.append(res.id)
    assert [d.id for d in await queue.dead_letters()] == ids[::-1]
    assert [d.reason for d in await queue.dead_letters(limit=2)] == ["r2", "r1"]
    assert await queue.dead_letters(limit=0) == []


async def test_reason_and_detail_are_bounded(queue: Queue):
    await queue.push("vela", b"x")
    res = await queue.reserve(["vela"], lease_s=LEASE)
    assert await queue.dead_letter(res, "r" * 500, "d" * 10_000)
    [dead] = await queue.dead_letters()
    assert len(dead.reason) == 64 and len(dead.detail) == 2000


async def test_depth_per_route(queue: Queue, clock):
    for route in ["vela", "vela", "vela", "gpu"]:
        await queue.push(route, b"x")
    await queue.reserve(["vela"], lease_s=LEASE)
    dead = await queue.reserve(["vela"], lease_s=LEASE)
    await queue.dead_letter(dead, "malformed")
    assert await queue.depth() == {
        "vela": RouteDepth(ready=1, in_flight=1, dead=1),
        "gpu": RouteDepth(ready=1),
    }
    assert (await queue.depth())["vela"].as_dict() == {"ready": 1, "in_flight": 1, "dead": 1}


async def test_reserve_waits_for_an_item_up_to_the_timeout(backend, clock):
    pushed = []

    async def sleep(_seconds):
        # The first poll finds nothing; an item arrives while we wait.
        if not pushed:
            pushed.append(await q.push("vela", b"late"))
        await asyncio.sleep(0)

    q = await backend.new(clock, sleep=sleep)
    res = await q.reserve(["vela"], lease_s=LEASE, timeout_s=30)
    assert res is not None and res.id == pushed[0]


async def test_reserve_gives_up_after_the_timeout(queue: Queue):
    assert await queue.reserve(["vela"], lease_s=LEASE, timeout_s=0.05) is None


async def test_concurrent_consumers_never_share_an_item(queue: Queue):
    ids = {await queue.push("vela", str(i).encode()) for i in range(20)}

    async def consumer() -> list[str]:
        got = []
        while (res := await queue.reserve(["vela"], lease_s=LEASE)) is not None:
            got.append(res.id)
            assert await queue.ack(res)
        return got

    results = await asyncio.gather(*(consumer() for _ in range(4)))
    flat = [i for r in results for i in r]
    assert sorted(flat) == sorted(ids), "each item exactly once"


async def test_reserve_many_in_order_across_routes_and_settle_many(queue: Queue):
    for payload in (b"v1", b"v2", b"v3"):
        await queue.push("vela", payload)
    await queue.push("gpu", b"g1")
    got = await queue.reserve_many(["gpu", "vela"], 3, lease_s=LEASE)
    assert [r.payload for r in got] == [b"g1", b"v1", b"v2"]
    assert len({r.lease_id for r in got}) == 3
    assert await queue.depth() == {"gpu": RouteDepth(in_flight=1),
                                   "vela": RouteDepth(ready=1, in_flight=2)}
    g1, v1, v2 = got
    done = await queue.settle_many([Settlement(g1, "ack"), Settlement(v1, "release"),
                                    Settlement(v2, "dead", "bad", "why")])
    assert done == [True, True, True]
    assert await queue.settle_many([Settlement(g1, "ack"), Settlement(v1, "ack")]) == [
        False, False], "a lease no longer current settles nothing"
    assert [d.payload for d in await queue.dead_letters()] == [b"v2"]
    again = await queue.reserve_many(["vela"], 5, lease_s=LEASE)
    assert [r.payload for r in again] == [b"v1", b"v3"]  # the released item first
    assert again[0].deliveries == 1
    assert await queue.reserve_many(["vela"], 5, lease_s=LEASE) == []
    with pytest.raises(QueueError):
        await queue.reserve_many(["vela"], 0, lease_s=LEASE)
    with pytest.raises(QueueError):
        await queue.settle_many([Settlement(again[0], "shelve")])


async def test_items_released_together_keep_their_order(queue: Queue):
    """The listener prefetches items and releases those no slot took, together: the
    route's order must survive that, pass after pass."""
    for i in range(6):
        await queue.push("vela", f"b{i}".encode())
    for _ in range(3):
        got = await queue.reserve_many(["vela"], 5, lease_s=LEASE)
        assert [r.payload for r in got] == [f"b{i}".encode() for i in range(5)]
        assert await queue.settle_many([Settlement(r, "release") for r in got]) == [True] * 5
    rest = await queue.reserve_many(["vela"], 10, lease_s=LEASE)
    assert [r.payload for r in rest] == [f"b{i}".encode() for i in range(6)]


@pytest.mark.parametrize("routes", [[], "vela", [""]])
async def test_reserve_rejects_bad_routes(queue: Queue, routes):
    with pytest.raises(QueueError):
        await queue.reserve(routes, lease_s=LEASE)


async def test_bad_arguments(queue: Queue):
    with pytest.raises(QueueError):
        await queue.push("", b"x")
    with pytest.raises(QueueError):
        await queue.push("vela", "text")  # type: ignore[arg-type]
    with pytest.raises(QueueError):
        await queue.reserve(["vela"], lease_s=0)


async def test_a_push_within_a_transaction_of_the_queues_own_database_only(
        queue: Queue, engine, backend_name):
    """Only a queue that lives in the database can take part in its transactions: the
    item appears with the commit, and never after a rollback."""
    from vela.db.engine import database

    other = object()
    assert queue.pusher_within(other) is None
    push = queue.pusher_within(engine)
    if backend_name in ("fakeredis", "redis"):
        assert push is None
        return
    assert push is not None
    db = database(engine)
    with pytest.raises(QueueError):
        await db.write(lambda s: push(s, "", b"x"))

    def then_fail(s):
        push(s, "vela", b"rolled back")
        raise RuntimeError("the rest of the transaction failed")

    with pytest.raises(RuntimeError):
        await db.write(then_fail)
    assert await queue.depth() == {}
    await db.write(lambda s: push(s, "vela", b"committed"))
    res = await queue.reserve(["vela"], lease_s=LEASE)
    assert res is not None and res.payload == b"committed"


async def test_context_manager_closes(backend, clock):
    async with await backend.new(clock) as q:
        await q.push("vela", b"x")
