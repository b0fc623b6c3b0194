"""The Redis back end takes a listener pass's items in one transaction and settles
them in one, on fakeredis and on the real Redis."""

from __future__ import annotations

import pytest

from vela.queue.base import Settlement
from vela.queue.redis_queue import RedisQueue

pytestmark = pytest.mark.parametrize(
    ("backend_name", "engine"), [("fakeredis", "sqlite"), ("redis", "sqlite")],
    indirect=["engine"], ids=["fakeredis", "redis"])


def count_transactions(queue: RedisQueue, monkeypatch) -> list[list[str]]:
    """The keys each optimistic transaction watched, one entry per transaction."""
    seen: list[list[str]] = []
    watched = queue._watched

    async def counting(keys, body):
        seen.append(list(keys))
        return await watched(keys, body)

    monkeypatch.setattr(queue, "_watched", counting)
    return seen


async def test_a_pass_reserves_in_one_transaction_and_settles_in_one(backend, clock,
                                                                       monkeypatch):
    queue = await backend.new(clock)
    ids = [await queue.push("vela", f"item {i}".encode()) for i in range(10)]
    txns = count_transactions(queue, monkeypatch)
    got = await queue.reserve_many(["vela"], 8, lease_s=30)
    assert [r.id for r in got] == ids[:8] and len(txns) == 1
    assert [r.payload for r in got] == [f"item {i}".encode() for i in range(8)]
    assert all(r.deliveries == 1 for r in got)
    out = await queue.settle_many(
        [Settlement(got[0], "ack"), Settlement(got[1], "dead", "bad", "why"),
         *(Settlement(r, "release") for r in got[2:])])
    assert out == [True] * 8 and len(txns) == 2
    # The released items are back at the head in their order, before the two never taken.
    again = await queue.reserve_many(["vela"], 10, lease_s=30)
    assert [r.id for r in again] == ids[2:]
    assert [r.deliveries for r in again] == [1] * 8
    assert [d.id for d in await queue.dead_letters()] == [ids[1]]


async def test_a_stale_lease_in_a_batch_is_refused_alone(backend, clock):
    queue = await backend.new(clock)
    a, b, c = [await queue.push("vela", b"x%d" % i) for i in range(3)]
    stale = (await queue.reserve_many(["vela"], 1, lease_s=5))[0]
    clock.advance(10)
    assert await queue.reclaim_expired() == 1
    fresh = await queue.reserve_many(["vela"], 3, lease_s=30)
    assert [r.id for r in fresh] == [a, b, c]
    out = await queue.settle_many([Settlement(stale, "ack"), Settlement(fresh[1], "ack"),
                                   Settlement(fresh[2], "release")])
    assert out == [False, True, True]
    depth = (await queue.depth())["vela"]
    assert (depth.ready, depth.in_flight) == (1, 1)  # c back; a still leased, anew
    assert await queue.settle_many([Settlement(fresh[0], "ack"),
                                    Settlement(fresh[0], "release")]) == [True, False]
    assert (await queue.depth())["vela"].in_flight == 0


async def test_an_id_whose_item_was_deleted_by_hand_is_dropped(backend, clock):
    queue = await backend.new(clock)
    assert isinstance(queue, RedisQueue)
    ids = [await queue.push("vela", b"p%d" % i) for i in range(3)]
    await queue._r.delete(queue._item(ids[1]))
    got = await queue.reserve_many(["vela"], 3, lease_s=30)
    assert [r.id for r in got] == [ids[0], ids[2]]
    assert await queue._r.exists(queue._item(ids[1])) == 0
    assert await queue._r.zscore(queue._k("leased", "vela"), ids[1]) is None
    depth = (await queue.depth())["vela"]
    assert (depth.ready, depth.in_flight) == (0, 2)
