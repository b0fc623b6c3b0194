"""Concurrent calls coalesced into batch calls (vela.coalesce)."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from vela.coalesce import MAX_BATCH, Coalescer, answer_each
from vela.errors import Unavailable
from vela.security import Reason, Rejected


class Far:
    """A batch call that holds each batch until the test lets it go."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()

    async def send(self, batch: list[int]) -> list[int | BaseException]:
        self.batches.append(batch)
        self.arrived.set()
        await self.gate.wait()
        return [ValueError(f"odd {n}") if n % 2 else n * 10 for n in batch]


async def test_calls_made_together_go_in_one_batch_and_each_gets_its_own_answer():
    far = Far()
    far.gate.set()
    c = Coalescer(far.send)
    results = await asyncio.gather(*(c.call(n) for n in range(4)), return_exceptions=True)
    assert far.batches == [[0, 1, 2, 3]]
    assert results[0] == 0 and results[2] == 20
    assert [str(r) for r in results[1::2]] == ["odd 1", "odd 3"]  # only their own callers


async def test_calls_made_while_a_batch_is_in_flight_wait_for_the_next():
    far = Far()
    c = Coalescer(far.send)
    first = asyncio.ensure_future(c.call(2))
    await far.arrived.wait()
    later = [asyncio.ensure_future(c.call(n)) for n in (4, 6)]
    await asyncio.sleep(0)  # let them queue (they must not start a second call)
    assert far.batches == [[2]]
    far.gate.set()
    assert await first == 20 and [await t for t in later] == [40, 60]
    assert far.batches == [[2], [4, 6]]
    assert (c.batches, c.requests) == (2, 3)


async def test_batches_never_exceed_the_limit():
    far = Far()
    far.gate.set()
    c = Coalescer(far.send, max_batch=3)
    assert await asyncio.gather(*(c.call(2 * n) for n in range(7))) == [
        20 * n for n in range(7)]
    assert [len(b) for b in far.batches] == [3, 3, 1]


async def test_a_failed_call_fails_each_caller_and_the_next_call_goes_out():
    calls = 0

    async def send(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("actor unavailable")
        if calls == 2:
            return batch[:-1]  # an answer short: nobody may get someone else's
        return batch

    c = Coalescer(send)
    for _ in range(2):
        results = await asyncio.gather(c.call(1), c.call(2), return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)
    assert await c.call(3) == 3


async def test_a_caller_that_gave_up_is_not_sent():
    far = Far()
    c = Coalescer(far.send)
    first = asyncio.ensure_future(c.call(2))
    await far.arrived.wait()
    gone = asyncio.ensure_future(c.call(4))
    kept = asyncio.ensure_future(c.call(6))
    await asyncio.sleep(0)
    gone.cancel()
    far.gate.set()
    assert await first == 20 and await kept == 60
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert far.batches == [[2], [6]]


async def test_the_receiving_end_answers_each_request_on_its_own():
    """answer_each: a failure is its own request's answer; one of ours goes as itself,
    anything else as Unavailable, named by type, never with what it held."""

    async def one(n: int) -> int:
        if n == 1:
            raise Rejected(Reason.WRONG_BUILD, "not yours")
        if n == 2:
            raise RuntimeError("password=hunter2 in a driver's message")
        return n * 10

    zero, refused, broken, three = await answer_each([0, 1, 2, 3], one)
    assert (zero, three) == (0, 30)
    assert isinstance(refused, Rejected) and refused.reason is Reason.WRONG_BUILD
    assert isinstance(broken, Unavailable) and "RuntimeError" in str(broken)
    assert "hunter2" not in repr(broken) and broken.__cause__ is None
    assert pickle.loads(pickle.dumps(refused)).reason is Reason.WRONG_BUILD  # crosses Ray


@pytest.mark.parametrize("batch", ["not a list", list(range(MAX_BATCH + 1))])
async def test_the_receiving_end_refuses_a_malformed_or_oversized_batch_whole(batch):
    async def one(n: object) -> object:
        raise AssertionError("not called")

    with pytest.raises(Rejected) as e:
        await answer_each(batch, one)
    assert e.value.reason is Reason.MALFORMED


async def test_concurrent_answers_let_one_request_wait_on_another():
    opened = asyncio.Event()

    async def one(n: int) -> int:
        if n == 0:
            await asyncio.wait_for(opened.wait(), 5)  # waits on the request after it
        else:
            opened.set()
        return n

    assert await answer_each([0, 1], one, concurrently=True) == [0, 1]


def test_call_counter_turns_totals_into_increments():
    """Running totals per client become increments per target and method; a client
    whose totals restart (a worker attached again) counts from zero, a gone one is
    forgotten, and an unchanged one adds nothing."""
    from vela.metrics import CallCounter

    counter = CallCounter()
    assert counter.increments({("workers", "w1", "m"): (2, 5), ("workers", "w2", "m"): (1, 1),
                               ("authority", "", "v"): (3, 3)}) == {
        ("workers", "m"): (3, 6), ("authority", "v"): (3, 3)}
    assert counter.increments({("workers", "w1", "m"): (2, 5), ("workers", "w2", "m"): (1, 1),
                               ("authority", "", "v"): (3, 3)}) == {}
    # w1 reattached (a new client: its totals restart), w2 is gone, the authority moved.
    assert counter.increments({("workers", "w1", "m"): (1, 2),
                               ("authority", "", "v"): (4, 7)}) == {
        ("workers", "m"): (1, 2), ("authority", "v"): (1, 4)}
    # w2 back with a new client: counted from zero, not against its old totals.
    assert counter.increments({("workers", "w1", "m"): (1, 2), ("workers", "w2", "m"): (1, 1),
                               ("authority", "", "v"): (4, 7)}) == {("workers", "m"): (1, 1)}


def test_our_errors_cross_an_actor_call_whole():
    """A batch's answers are pickled by Ray: an error that cannot be rebuilt from its
    pickle sank every answer of its batch (PipelineError, QueueItemInvalid did)."""
    from vela.pipeline import PipelineError
    from vela.queue.item import InvalidReason, QueueItemInvalid

    problems = [(3, "steps[0].commands", "field required")]
    back = pickle.loads(pickle.dumps(PipelineError(problems)))
    assert back.problems == problems and str(back) == "line 3: steps[0].commands: field required"
    item = pickle.loads(pickle.dumps(QueueItemInvalid(InvalidReason.MALFORMED, "not JSON")))
    assert (item.reason, item.detail, str(item)) == (
        InvalidReason.MALFORMED, "not JSON", "queue item refused (malformed): not JSON")
    claimed = pickle.loads(pickle.dumps(QueueItemInvalid(InvalidReason.UNKNOWN_KID, "k", 7)))
    assert (claimed.reason, claimed.claimed_build_id) == (InvalidReason.UNKNOWN_KID, 7)


async def test_an_error_that_cannot_cross_whole_goes_as_its_text():
    from vela.errors import VelaError

    class Stubborn(VelaError):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}+{b}")

    async def one(request: int) -> int:
        if request == 2:
            raise Stubborn(1, 2)
        return request

    answers = await answer_each([1, 2, 3], one)
    pickle.loads(pickle.dumps(answers))  # the batch's answer crosses whole
    assert answers[0] == 1 and answers[2] == 3
    assert isinstance(answers[1], Unavailable) and "Stubborn: 1+2" in str(answers[1])
