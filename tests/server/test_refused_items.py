"""A queue item refused for its signature may have been its build's own: signed by a
queue key since cut (`vela keys rotate --verify-for 0`), or tampered with. Its build
must not stay pending for ever: the listener has the Scheduler queue it again, with a
fresh item, if it is still pending — and only then. On SQLite with the database queue
and on PostgreSQL with Redis."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.server.conftest import pipeline
from vela.queue import ItemSigner, QueueItem


async def test_a_pending_build_whose_item_no_key_verifies_runs_all_the_same(system):
    build_id = await system.submit(pipeline("echo still here"))
    done = await system.submit(pipeline("echo done"))
    # Its item, as a key the server no longer trusts signed it; and one naming a build
    # that is not pending, which must queue nothing.
    own = await system.queue.reserve(["vela"], lease_s=30)
    await system.queue.ack(own)
    cut = ItemSigner(Ed25519PrivateKey.generate(), "a-key-since-cut")
    await system.queue.push("vela", cut.sign(QueueItem.new(build_id, "vela")))

    await system.add_worker("w1")
    builds = await system.pump([build_id, done], timeout_s=30)
    assert builds[build_id].status == "success"
    assert builds[done].status == "success"
    assert [d.reason for d in await system.queue.dead_letters()] == ["unknown_kid"]
    assert system.listener.stats.requeued == 1

    # A forged item naming a finished build: dead-lettered, nothing queued again.
    await system.queue.push("vela", cut.sign(QueueItem.new(done, "vela")))
    await system.listener.run_until_idle()
    assert len(await system.queue.dead_letters()) == 2
    assert system.listener.stats.requeued == 1
    assert (await system.store.get_build(done)).status == "success"


async def test_a_forged_item_naming_a_build_id_past_the_database_range_poisons_nothing(system):
    """A forged item's build id is any JSON int: one past the database's integer range
    must not make every later requeue fail (the pending build named next to it runs)."""
    build_id = await system.submit(pipeline("echo still here"))
    own = await system.queue.reserve(["vela"], lease_s=30)
    await system.queue.ack(own)
    cut = ItemSigner(Ed25519PrivateKey.generate(), "a-key-since-cut")
    await system.queue.push("vela", cut.sign(QueueItem.model_construct(
        v=1, build_id=2**64, route="vela", enqueued_at=0.0, attempt=1)))
    await system.queue.push("vela", cut.sign(QueueItem.new(build_id, "vela")))

    await system.add_worker("w1")
    builds = await system.pump([build_id], timeout_s=30)
    assert builds[build_id].status == "success"
    assert system.listener.stats.requeued == 1


async def test_requeue_pending_queues_every_pending_build_it_is_asked_for(system):
    """The listener forgets every id it asked for once requeue_pending answers: ids past
    the first thousand must not be dropped unasked (a pending build left for ever)."""
    build_id = await system.submit(pipeline("echo still here"))
    own = await system.queue.reserve(["vela"], lease_s=30)
    await system.queue.ack(own)
    assert await system.scheduler.requeue_pending(
        [10**9 + i for i in range(1000)] + [build_id]) == 1
    again = await system.queue.reserve(["vela"], lease_s=30)
    assert again is not None and QueueItem.model_validate(
        json.loads(again.payload)["item"]).build_id == build_id
