"""The listener's logic, against real back ends and a recording fake scheduler."""

from __future__ import annotations

import asyncio
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from tests.queue.conftest import FakeScheduler, on_all_backends, signed
from vela.queue import (
    Backoff,
    Capacity,
    Dispatcher,
    ItemSigner,
    Listener,
    Outcome,
    Queue,
    Rejected,
    RouteDepth,
    Step,
)

LEASE = 30.0


class Sleeps:
    """An injected sleep that records what the listener asked for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def make_listener(queue, verifier, scheduler, clock, **kw) -> Listener:
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("backoff", Backoff(base_s=0.1, cap_s=2.0, rng=lambda: 1.0))
    return Listener(queue, verifier, scheduler, lease_s=LEASE, reserve_timeout_s=0,
                    reclaim_every_s=1.0, clock=clock, **kw)


def test_fake_scheduler_is_a_dispatcher():
    assert isinstance(FakeScheduler(), Dispatcher)


@on_all_backends
class TestOnEveryBackend:
    async def test_dispatches_and_acks(self, queue, verifier, signer, scheduler, clock):
        for build in (1, 2):
            scheduler.add(build)
            await queue.push("vela", signed(signer, build))
        listener = make_listener(queue, verifier, scheduler, clock)
        assert await listener.run_until_idle() == [Step.DISPATCHED, Step.DISPATCHED, Step.IDLE]
        assert scheduler.dispatched == [1, 2]
        assert await queue.depth() == {}
        assert (listener.stats.reserved, listener.stats.acked) == (2, 2)
        assert listener.healthy

    async def test_reserves_only_for_routes_with_a_free_slot(self, queue, verifier, signer,
                                                             scheduler, clock):
        scheduler.add(1)
        await queue.push("vela", signed(signer, 1))
        listener = make_listener(queue, verifier, scheduler, clock)

        scheduler.free = set()
        assert await listener.run_once() is Step.NO_CAPACITY
        scheduler.free = {"gpu", "unconfigured"}
        assert await listener.run_once() is Step.IDLE
        assert scheduler.submitted == []
        assert await queue.depth() == {"vela": RouteDepth(ready=1)}

        scheduler.free = {"vela"}
        assert await listener.run_once() is Step.DISPATCHED
        assert scheduler.dispatched == [1]

    async def test_no_capacity_after_all_releases_and_keeps_the_item(self, queue, verifier,
                                                                     signer, scheduler, clock):
        scheduler.add(1)
        await queue.push("vela", signed(signer, 1))
        outcomes = [Outcome.NO_CAPACITY, Outcome.RETRY]

        async def answer(item):
            return outcomes.pop(0) if outcomes else None

        scheduler.answer = answer
        listener = make_listener(queue, verifier, scheduler, clock)
        assert await listener.run_once() is Step.RELEASED
        assert await queue.depth() == {"vela": RouteDepth(ready=1)}
        assert await listener.run_once() is Step.RELEASED
        assert await listener.run_once() is Step.DISPATCHED
        assert scheduler.dispatched == [1]
        assert listener.stats.released == 2

    async def test_an_item_the_verifier_chokes_on_is_dead_lettered_alone(
            self, queue, verifier, signer, scheduler, clock, monkeypatch):
        """A verifier bug (any error but QueueItemInvalid) on one item failed every pass
        that reserved it, the others' too, for as long as the item came back."""
        await queue.push("vela", b"choke")
        scheduler.add(2)
        await queue.push("vela", signed(signer, 2))
        check = verifier.verify

        def verify(raw, *, route):
            if raw == b"choke":
                raise RuntimeError("a bug")
            return check(raw, route=route)

        monkeypatch.setattr(verifier, "verify", verify)
        listener = make_listener(queue, verifier, scheduler, clock)
        steps = await listener.run_until_idle()
        assert Step.DEAD_LETTERED in steps and Step.DISPATCHED in steps
        assert scheduler.dispatched == [2]
        [dead] = await queue.dead_letters()
        assert (dead.reason, dead.detail) == ("malformed", "could not be checked: RuntimeError")

    async def test_rejected_is_dead_lettered_with_the_schedulers_reason(
            self, queue, verifier, signer, scheduler, clock):
        await queue.push("vela", signed(signer, 404))  # the scheduler knows no build 404
        scheduler.add(2)
        await queue.push("vela", signed(signer, 2))
        listener = make_listener(queue, verifier, scheduler, clock)
        assert await listener.run_until_idle() == [Step.DEAD_LETTERED, Step.DISPATCHED, Step.IDLE]
        [dead] = await queue.dead_letters()
        assert (dead.reason, dead.detail) == ("build_not_found", "build 404")
        assert listener.stats.dead_lettered == {"build_not_found": 1}

    async def test_bare_rejected_outcome_gets_a_generic_reason(self, queue, verifier, signer,
                                                               scheduler, clock):
        async def answer(item):
            return Outcome.REJECTED

        scheduler.answer = answer
        await queue.push("vela", signed(signer, 1))
        listener = make_listener(queue, verifier, scheduler, clock)
        assert await listener.run_once() is Step.DEAD_LETTERED
        assert [d.reason for d in await queue.dead_letters()] == ["rejected"]

    async def test_submit_raising_releases_and_the_listener_keeps_going(
            self, queue, verifier, signer, scheduler, clock):
        scheduler.add(1)
        await queue.push("vela", signed(signer, 1))
        failures = [RuntimeError("scheduler actor died"), ValueError("garbled reply")]

        async def answer(item):
            if failures:
                raise failures.pop(0)
            return None

        scheduler.answer = answer
        listener = make_listener(queue, verifier, scheduler, clock)
        assert await listener.run_once() is Step.RELEASED
        assert await listener.run_once() is Step.RELEASED
        assert await queue.depth() == {"vela": RouteDepth(ready=1)}
        assert await listener.run_once() is Step.DISPATCHED
        assert scheduler.dispatched == [1]
        assert listener.stats.submit_errors == 2

    async def test_unknown_outcome_is_treated_like_a_failed_submit(self, queue, verifier, signer,
                                                                   scheduler, clock):
        async def answer(item):
            return "maybe"

        scheduler.answer = answer
        await queue.push("vela", signed(signer, 1))
        listener = make_listener(queue, verifier, scheduler, clock)
        assert await listener.run_once() is Step.RELEASED
        assert listener.stats.submit_errors == 1

    async def test_consumer_killed_between_reserve_and_ack_dispatches_exactly_once(
            self, queue, verifier, signer, scheduler, clock):
        scheduler.add(1)
        await queue.push("vela", signed(signer, 1))
        entered, hang = asyncio.Event(), asyncio.Event()

        async def stuck(item):
            entered.set()
            await hang.wait()  # never set: the process dies in here

        scheduler.answer = stuck
        doomed = make_listener(queue, verifier, scheduler, clock)
        task = asyncio.create_task(doomed.run_once())
        await entered.wait()
        task.cancel()  # the consumer is killed: no release, no ack
        with pytest.raises(asyncio.CancelledError):
            await task
        assert scheduler.dispatched == []
        assert await queue.depth() == {"vela": RouteDepth(in_flight=1)}

        scheduler.answer = None
        survivor = make_listener(queue, verifier, scheduler, clock)
        # Before the lease runs out the item stays with the dead consumer.
        clock.advance(LEASE - 1)
        assert await survivor.run_once() is Step.IDLE
        clock.advance(1)
        assert await survivor.run_until_idle() == [Step.DISPATCHED, Step.IDLE]
        assert scheduler.dispatched == [1]
        assert survivor.stats.reclaimed == 1
        assert await queue.depth() == {}

    async def test_consumer_killed_after_dispatch_before_ack_is_not_dispatched_again(
            self, backend, verifier, signer, scheduler, clock):
        queue = await backend.new(clock)
        scheduler.add(1)
        await queue.push("vela", signed(signer, 1))
        entered, hang = asyncio.Event(), asyncio.Event()

        class DiesBeforeAck(QueueProxy):
            async def ack(self, res):
                entered.set()
                await hang.wait()

        doomed = make_listener(DiesBeforeAck(queue), verifier, scheduler, clock)
        task = asyncio.create_task(doomed.run_once())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert scheduler.dispatched == [1]

        clock.advance(LEASE)
        survivor = make_listener(queue, verifier, scheduler, clock)
        assert await survivor.run_until_idle() == [Step.SKIPPED, Step.IDLE]
        assert scheduler.dispatched == [1], "the redelivery is acked without a second dispatch"
        assert len(scheduler.submitted) == 2
        assert await queue.depth() == {}

    async def test_redelivered_item_whose_build_is_no_longer_pending_is_acked(
            self, queue, verifier, signer, scheduler, clock):
        scheduler.add(1, status="canceled")
        await queue.push("vela", signed(signer, 1))
        listener = make_listener(queue, verifier, scheduler, clock)
        assert await listener.run_until_idle() == [Step.SKIPPED, Step.IDLE]
        assert scheduler.dispatched == []
        assert listener.stats.acked == 1
        assert await queue.depth() == {}

    async def test_lease_lapsing_during_a_slow_submit(self, queue, verifier, signer, scheduler,
                                                      clock):
        scheduler.add(1)
        await queue.push("vela", signed(signer, 1))
        other = make_listener(queue, verifier, scheduler, clock)

        async def slow(item):
            scheduler.answer = None
            # Meanwhile the lease runs out and another listener gets the item.
            clock.advance(LEASE + 1)
            assert await other.run_once() is Step.DISPATCHED
            return Outcome.DISPATCHED

        scheduler.answer = slow
        listener = make_listener(queue, verifier, scheduler, clock)
        assert await listener.run_once() is Step.LEASE_LOST
        assert listener.stats.lease_lost == 1
        assert scheduler.dispatched == [1]
        assert await queue.depth() == {}

    async def test_invalid_items_are_dead_lettered_each_with_its_reason(
            self, queue, verifier, signer, scheduler, clock):
        good = json.loads(signed(signer, 1))
        tampered = json.loads(signed(signer, 2))
        tampered["item"]["build_id"] = 3
        stranger = ItemSigner(Ed25519PrivateKey.generate(), "intruder")
        bad = {
            "malformed": b"\x00 this is not json",
            "too_large": signed(signer, 4) + b" " * 5000,
            "bad_signature": json.dumps(tampered).encode(),
            "unsigned": json.dumps(good["item"]).encode(),
            "route_mismatch": signed(signer, 5, route="gpu"),
            "unknown_route": signed(signer, 6, route="nowhere"),
            "unknown_kid": signed(stranger, 7),
        }
        for payload in bad.values():
            await queue.push("vela", payload)
        scheduler.add(8)
        await queue.push("vela", signed(signer, 8))

        listener = make_listener(queue, verifier, scheduler, clock)
        steps = await listener.run_until_idle()
        assert steps == [Step.DEAD_LETTERED] * len(bad) + [Step.DISPATCHED, Step.IDLE]
        assert scheduler.submitted and [i.build_id for i in scheduler.submitted] == [8]
        assert scheduler.dispatched == [8]
        dead = await queue.dead_letters()
        assert {d.reason: d.payload for d in dead} == bad
        assert dict(listener.stats.dead_lettered) == dict.fromkeys(bad, 1)
        assert await queue.depth() == {"vela": RouteDepth(dead=len(bad))}
        # Refused for its signature alone, an item may have been its build's own: the
        # builds those items name are asked to be queued again if still pending (a
        # harmless thing to ask, whoever forged the name); nothing else is.
        assert sorted(sum(scheduler.requeue_asked, [])) == [3, 7]

    async def test_the_builds_of_items_refused_for_their_signature_are_queued_again(
            self, queue, verifier, signer, scheduler, clock):
        """A pending build whose item was signed by a key no longer trusted (cut by
        `vela keys rotate --verify-for 0`) is queued again rather than left pending;
        a forged item naming a build that is not pending queues nothing."""
        gone = ItemSigner(Ed25519PrivateKey.generate(), "cut-key")
        scheduler.add(4)
        scheduler.add(5, status="running")
        await queue.push("vela", signed(gone, 4))
        await queue.push("vela", signed(gone, 5))
        await queue.push("vela", b'{"item": {"build_id": 6}}')  # unsigned, names 6

        asked: list[list[int]] = []

        async def down(build_ids):
            raise ConnectionError("scheduler restarting")

        scheduler.requeue_pending, real = down, scheduler.requeue_pending  # type: ignore[method-assign]
        listener = make_listener(queue, verifier, scheduler, clock)
        await listener.run_until_idle()
        assert listener.stats.requeued == 0  # kept for the next pass

        async def back(build_ids):
            asked.append(build_ids)
            return await real(build_ids)

        scheduler.requeue_pending = back  # type: ignore[method-assign]
        await listener.run_once()
        assert asked == [[4, 5, 6]] and listener.stats.requeued == 1
        await listener.run_once()
        assert asked == [[4, 5, 6]]  # asked once

    async def test_builds_kept_to_be_queued_again_are_bounded(
            self, queue, verifier, scheduler, clock, monkeypatch):
        """While the dispatcher cannot be asked, the builds that refused items name are
        kept for the next pass, never more than MAX_CLAIMED of them (anyone who can
        write to the queue can name any number)."""
        from vela.queue import listener as listener_mod

        monkeypatch.setattr(listener_mod, "MAX_CLAIMED", 3)
        stranger = ItemSigner(Ed25519PrivateKey.generate(), "intruder")
        for build_id in range(1, 6):
            await queue.push("vela", signed(stranger, build_id))

        async def down(build_ids):
            raise ConnectionError("scheduler restarting")

        scheduler.requeue_pending = down  # type: ignore[method-assign]
        listener = make_listener(queue, verifier, scheduler, clock)
        await listener.run_until_idle()
        assert listener.stats.dead_lettered["unknown_kid"] == 5
        assert len(listener._claimed) == 3

    async def test_poison_item_is_dead_lettered_after_max_deliveries(
            self, queue, verifier, signer, scheduler, clock):
        scheduler.add(1)
        await queue.push("vela", signed(signer, 1))
        for _ in range(2):  # two consumers die holding it
            await queue.reserve(["vela"], lease_s=LEASE)
            clock.advance(LEASE)
            await queue.reclaim_expired()
        listener = make_listener(queue, verifier, scheduler, clock, max_deliveries=2)
        assert await listener.run_once() is Step.DEAD_LETTERED
        [dead] = await queue.dead_letters()
        assert dead.reason == "too_many_deliveries"
        assert scheduler.submitted == []


class QueueProxy(Queue):
    """Forwards to a real queue; subclasses interfere."""

    def __init__(self, inner: Queue | None) -> None:
        super().__init__()
        self.inner = inner

    async def _push(self, route, payload):
        return await self.inner.push(route, payload)

    async def _reserve_once(self, routes, lease_s):
        return await self.inner.reserve(routes, lease_s=lease_s)

    async def ack(self, res):
        return await self.inner.ack(res)

    async def release(self, res):
        return await self.inner.release(res)

    async def dead_letter(self, res, reason, detail=""):
        return await self.inner.dead_letter(res, reason, detail)

    async def reclaim_expired(self, now=None):
        return await self.inner.reclaim_expired(now)

    async def depth(self):
        return await self.inner.depth()

    async def dead_letters(self, limit=100):
        return await self.inner.dead_letters(limit)

    async def requeue(self, dead_id):
        return await self.inner.requeue(dead_id)

    async def close(self):
        await self.inner.close()


class Flaky(QueueProxy):
    """Raises connection errors while ``down``; with ``lose_replies`` the operation
    happens first and only the reply is lost (the nastiest case)."""

    OPS = ("reserve", "ack", "release", "dead_letter", "reclaim_expired")

    def __init__(self, inner: Queue, error: Exception) -> None:
        super().__init__(inner)
        self.down = False
        self.lose_replies = False
        self.error = error
        self.calls = 0

    async def _gate(self, coro):
        self.calls += 1
        if self.down and not self.lose_replies:
            coro.close()
            raise self.error
        result = await coro
        if self.down:
            raise self.error
        return result

    async def _reserve_once(self, routes, lease_s):
        return await self._gate(self.inner.reserve(routes, lease_s=lease_s))

    async def ack(self, res):
        return await self._gate(self.inner.ack(res))

    async def release(self, res):
        return await self._gate(self.inner.release(res))

    async def dead_letter(self, res, reason, detail=""):
        return await self._gate(self.inner.dead_letter(res, reason, detail))

    async def reclaim_expired(self, now=None):
        return await self._gate(self.inner.reclaim_expired(now))


OUTAGE_ERRORS = {
    "redis": RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    "database": OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused")),
    "os": ConnectionResetError("connection reset by peer"),
}


@on_all_backends
@pytest.mark.parametrize("error", OUTAGE_ERRORS.values(), ids=OUTAGE_ERRORS.keys())
@pytest.mark.parametrize("lose_replies", [False, True], ids=["refused", "reply-lost"])
async def test_outage_backs_off_recovers_and_loses_or_duplicates_nothing(
        backend, verifier, signer, scheduler, clock, error, lose_replies):
    inner = await backend.new(clock)
    builds = list(range(1, 7))
    for b in builds:
        scheduler.add(b)
        await inner.push("vela", signed(signer, b))
    flaky = Flaky(inner, error)
    sleeps = Sleeps()
    listener = make_listener(flaky, verifier, scheduler, clock, sleep=sleeps)

    assert await listener.run_once() is Step.DISPATCHED
    flaky.down, flaky.lose_replies = True, lose_replies
    steps = [await listener.run_once() for _ in range(4)]
    assert steps == [Step.BACKEND_ERROR] * 4
    assert not listener.healthy
    assert type(error).__name__ in listener.last_error
    assert sleeps.delays == [0.1, 0.2, 0.4, 0.8], "exponential backoff"
    assert listener.stats.backend_errors == 4

    flaky.down = False
    # Whatever was in flight when the replies were lost comes back after its lease.
    clock.advance(LEASE)
    steps = await listener.run_until_idle()
    assert listener.healthy and listener.last_error is None
    assert listener.backoff.failures == 0
    assert sorted(scheduler.dispatched) == builds, "nothing lost, nothing dispatched twice"
    assert await inner.depth() == {}


@on_all_backends
async def test_reply_lost_after_dispatch_settles_on_the_next_pass(backend, verifier, signer,
                                                                 scheduler, clock):
    inner = await backend.new(clock)
    scheduler.add(1)
    await inner.push("vela", signed(signer, 1))
    flaky = Flaky(inner, RedisConnectionError("connection lost"))
    real_ack = flaky.ack

    async def ack_then_fail(res):
        flaky.ack = real_ack
        await inner.ack(res)
        raise RedisConnectionError("reply lost")

    flaky.ack = ack_then_fail
    listener = make_listener(flaky, verifier, scheduler, clock)
    assert await listener.run_once() is Step.BACKEND_ERROR
    assert listener.status()["unsettled"] == 1
    assert await listener.run_once() is Step.IDLE
    assert listener.status()["unsettled"] == 0
    assert scheduler.dispatched == [1]
    assert await inner.depth() == {}


@pytest.mark.parametrize("backend_name, engine", [("fakeredis", "sqlite")],
                         indirect=["engine"])
async def test_fakeredis_server_down_and_back(backend, verifier, signer, scheduler, clock):
    queue = await backend.new(clock)
    for b in (1, 2):
        scheduler.add(b)
        await queue.push("vela", signed(signer, b))
    sleeps = Sleeps()
    listener = make_listener(queue, verifier, scheduler, clock, sleep=sleeps)
    backend.fake_server.connected = False
    assert await listener.run_once() is Step.BACKEND_ERROR
    assert await listener.run_once() is Step.BACKEND_ERROR
    assert not listener.healthy and "ConnectionError" in listener.last_error
    assert listener.status()["healthy"] is False
    backend.fake_server.connected = True
    assert await listener.run_until_idle() == [Step.DISPATCHED, Step.DISPATCHED, Step.IDLE]
    assert listener.healthy
    assert scheduler.dispatched == [1, 2]


@on_all_backends
async def test_reconnect_replaces_the_queue(backend, verifier, signer, scheduler, clock):
    inner = await backend.new(clock)
    scheduler.add(1)
    await inner.push("vela", signed(signer, 1))
    broken = Flaky(inner, OSError("network unreachable"))
    broken.down = True
    opened = []

    async def reconnect():
        opened.append(QueueProxy(inner))
        return opened[-1]

    listener = make_listener(broken, verifier, scheduler, clock, reconnect=reconnect)
    assert await listener.run_once() is Step.BACKEND_ERROR
    assert listener.queue is opened[0]
    assert await listener.run_until_idle() == [Step.DISPATCHED, Step.IDLE]


async def test_dispatcher_failure_makes_the_listener_unhealthy_not_dead(verifier, clock):
    class DeadScheduler:
        async def capacity(self, wait_s=0.0, seen_work=None):
            raise RuntimeError("actor died")

        async def submit_many(self, items):  # pragma: no cover - never reached
            raise AssertionError

    class NoQueue(QueueProxy):
        async def reclaim_expired(self, now=None):
            return 0

    sleeps = Sleeps()
    listener = make_listener(NoQueue(None), verifier, DeadScheduler(), clock, sleep=sleeps)
    assert await listener.run_once() is Step.DISPATCHER_ERROR
    assert not listener.healthy and "actor died" in listener.last_error
    assert listener.stats.dispatcher_errors == 1
    assert sleeps.delays == [0.1]


async def test_reclaims_periodically_not_every_pass(verifier, scheduler, clock):
    calls = []

    class Counting(QueueProxy):
        async def reclaim_expired(self, now=None):
            calls.append(now)
            return 0

        async def _reserve_once(self, routes, lease_s):
            return None

    listener = make_listener(Counting(None), verifier, scheduler, clock)
    await listener.run_once()
    await listener.run_once()
    clock.advance(1.0)
    await listener.run_once()
    assert calls == [clock() - 1.0, clock()]


async def test_route_order_rotates_so_no_route_starves(verifier, scheduler, clock):
    asked = []

    class Recording(QueueProxy):
        async def reclaim_expired(self, now=None):
            return 0

        async def _reserve_once(self, routes, lease_s):
            asked.append(routes)
            return None

    listener = make_listener(Recording(None), verifier, scheduler, clock)
    for _ in range(3):
        await listener.run_once()
    assert asked == [["vela", "gpu"], ["gpu", "vela"], ["vela", "gpu"]]


async def test_run_forever_stops_on_the_event_and_survives_bugs(verifier, scheduler, clock):
    stop = asyncio.Event()
    passes = []

    class Buggy(QueueProxy):
        async def reclaim_expired(self, now=None):
            return 0

        async def _reserve_once(self, routes, lease_s):
            passes.append(1)
            if len(passes) == 1:
                raise KeyError("a bug, not an outage")
            if len(passes) == 3:
                stop.set()
            return None

    sleeps = Sleeps()
    listener = make_listener(Buggy(None), verifier, scheduler, clock, sleep=sleeps)
    await asyncio.wait_for(listener.run_forever(stop), timeout=10)
    assert len(passes) == 3
    assert sleeps.delays[0] == 0.1, "a failing pass backs off"
    assert listener.healthy and listener.last_error is None


async def test_run_forever_pause_is_cut_short_by_stop(verifier, scheduler, clock):
    stop = asyncio.Event()
    scheduler.free = set()

    async def long_sleep(seconds):
        stop.set()
        await asyncio.Event().wait()  # would sleep forever

    class Empty(QueueProxy):
        async def reclaim_expired(self, now=None):
            return 0

    listener = make_listener(Empty(None), verifier, scheduler, clock, sleep=long_sleep)
    await asyncio.wait_for(listener.run_forever(stop), timeout=10)


def test_backoff_grows_to_the_cap_with_jitter():
    rolls = iter([0.0, 1.0, 0.5] * 10)
    b = Backoff(base_s=1.0, cap_s=8.0, rng=lambda: next(rolls))
    delays = [b.next() for _ in range(6)]
    assert delays == [0.5, 2.0, 3.0, 4.0, 8.0, 6.0]
    b.reset()
    assert b.next() == 0.5


def test_rejected_carries_its_outcome():
    assert Rejected("x").outcome is Outcome.REJECTED


@on_all_backends
async def test_a_pass_places_a_batch_concurrently_but_never_more_than_the_free_slots(
        queue, verifier, signer, clock):
    """Submits overlap (the dispatcher sees all three before answering any), and a
    batch never exceeds the free slots the dispatcher reported."""

    class ThreeSlots(FakeScheduler):
        async def capacity(self, wait_s=0.0, seen_work=None):
            return Capacity({"vela": 3}, total=3, work=7)

    sched = ThreeSlots()
    all_in = asyncio.Event()

    async def hold(item):
        if len(sched.submitted) == 3:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 5)
        return None

    sched.answer = hold
    for build in range(1, 6):
        sched.add(build)
        await queue.push("vela", signed(signer, build))
    listener = make_listener(queue, verifier, sched, clock, batch=8)
    assert await listener.run_once() is Step.DISPATCHED
    assert sorted(sched.dispatched) == [1, 2, 3]
    assert listener.stats.acked == 3 and (await queue.depth())["vela"].ready == 2


@on_all_backends
async def test_a_pass_hands_its_items_over_in_one_call_and_settles_each_by_its_outcome(
        queue, verifier, signer, clock):
    """One ``submit_many`` per pass, however many items; an item's own failure
    releases only that item."""
    calls: list[list[int]] = []

    class Batches(FakeScheduler):
        async def capacity(self, wait_s=0.0, seen_work=None):
            return Capacity({"vela": 8}, total=8)

        async def submit_many(self, items):
            calls.append([i.build_id for i in items])
            return await super().submit_many(items)

    sched = Batches()

    async def fail_four(item):
        if item.build_id == 4:
            raise RuntimeError("placing this one failed")
        return None

    sched.answer = fail_four
    sched.add(1)
    sched.add(2, status="running")  # 3 is unknown
    sched.add(4)
    for build in (1, 2, 3, 4):
        await queue.push("vela", signed(signer, build))
    listener = make_listener(queue, verifier, sched, clock, batch=8)
    assert await listener.run_once() is Step.DISPATCHED
    assert calls == [[1, 2, 3, 4]]
    assert sched.dispatched == [1]
    assert [d.reason for d in await queue.dead_letters()] == ["build_not_found"]
    assert listener.stats.acked == 2 and listener.stats.submit_errors == 1
    assert (await queue.depth())["vela"].ready == 1  # 4, released


@on_all_backends
async def test_an_empty_queue_is_remembered_for_the_long_poll(queue, verifier, signer, clock):
    """After finding the queue empty the listener passes the dispatcher's work
    counter back, so the long poll waits for new work instead of spinning."""
    seen: list[int | None] = []

    class Counting(FakeScheduler):
        async def capacity(self, wait_s=0.0, seen_work=None):
            seen.append(seen_work)
            return Capacity({"vela": 1}, total=1, work=len(seen))

    sched = Counting()
    listener = make_listener(queue, verifier, sched, clock, wait_s=0.5)
    assert await listener.run_once() is Step.IDLE
    assert await listener.run_once() is Step.IDLE
    sched.add(1)
    await queue.push("vela", signed(signer, 1))
    assert await listener.run_once() is Step.DISPATCHED
    assert await listener.run_once() is Step.IDLE
    assert seen == [None, 1, 2, None]


def test_transient_errors_are_the_back_ends_being_unreachable_not_bad_items():
    import redis.exceptions

    from vela.queue.listener import is_transient

    for e in (RedisConnectionError("down"), redis.exceptions.TimeoutError(),
              OperationalError("SELECT 1", {}, Exception("gone")), ConnectionRefusedError()):
        assert is_transient(e), e
    for e in (ValueError("bad"), redis.exceptions.ResponseError("WRONGTYPE"), KeyError("x")):
        assert not is_transient(e), e

