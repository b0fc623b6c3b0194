"""Answers lost mid-dispatch — a commit's, a receipt's — and a database that fails while
a lost worker is forgotten: every build still ends or runs, once."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.exc import OperationalError

from tests.server.conftest import pipeline
from vela.domain import BuildStatus
from vela.executor import choose_runtime
from vela.queue.listener import Step
from vela.server.scheduler import WORKER_LOST


def lost_reply() -> OperationalError:
    return OperationalError("COMMIT", {}, Exception("server closed the connection"))


@pytest.mark.parametrize("undo_fails", [False, True])
async def test_a_dispatch_whose_commit_answer_is_lost_runs_once(system, monkeypatch,
                                                                undo_fails):
    """The compare-and-set to ``running`` commits, its answer is lost (the database
    restarted): the dispatch is undone and the build placed again. If the undo fails
    too, the slot stays taken until the watch finds the build missing on the worker."""
    core = await system.add_worker("w1")
    build_id = await system.submit(pipeline("true"))
    real = system.store.transition_build
    failures: list[tuple] = []

    async def flaky(bid, expected, new, **kw):
        undo = (expected, new) == (BuildStatus.RUNNING, BuildStatus.PENDING)
        if undo and undo_fails and len(failures) == 1:
            failures.append((expected, new))
            raise lost_reply()
        out = await real(bid, expected, new, **kw)
        if (expected, new) == (BuildStatus.PENDING, BuildStatus.RUNNING) and not failures:
            failures.append((expected, new))
            raise lost_reply()
        return out

    monkeypatch.setattr(system.store, "transition_build", flaky)
    builds = await system.pump([build_id], timeout_s=30)
    assert builds[build_id].status == BuildStatus.SUCCESS.value
    assert builds[build_id].attempts == 2  # the lost dispatch, then the one that ran
    assert len(failures) == (2 if undo_fails else 1)
    assert core.running == [] and system.scheduler.registry.get("w1").running == set()


async def test_a_database_error_while_forgetting_a_lost_worker_is_retried(system,
                                                                          monkeypatch):
    await system.add_worker("w1")
    slow = await system.submit(pipeline("echo started", "sleep 30"))
    await system.pump([slow], until=lambda b: b[slow].started_at is not None)
    await system.directory.clients["w1"].kill()
    real = system.store.list_builds
    failed: list[int] = []

    async def flaky(**kw):
        if kw.get("worker") == "w1" and not failed:
            failed.append(1)
            raise lost_reply()
        return await real(**kw)

    monkeypatch.setattr(system.store, "list_builds", flaky)
    builds = await system.pump([slow], timeout_s=10)
    assert failed
    assert (builds[slow].status, builds[slow].reason) == ("error", WORKER_LOST)


@pytest.mark.parametrize("started", [True, False])
async def test_worker_lost_while_its_receipt_is_on_the_way(system, started):
    """worker_lost leaves a build being dispatched to the dispatch; a receipt that then
    says "accepted" from the lost worker ends it worker_lost (started) or queues it
    again (held in the backlog, never started)."""
    await system.add_worker("w1", backlog=0 if started else 1)
    client = system.directory.clients["w1"]
    gate, entered = asyncio.Event(), asyncio.Event()
    real = client._execute_package
    if not started:  # a slot taken by a long build: the next one is held
        first = await system.submit(pipeline("sleep 30"))
        await system.pump([first], until=lambda b: b[first].started_at is not None)

    async def slow(package):
        receipt = await real(package)  # taken...
        entered.set()
        await gate.wait()              # ...and its reply on the way
        return receipt

    client._execute_package = slow
    # Started, it must still run when the loss is declared; held, it cannot start.
    build_id = await system.submit(pipeline("echo hi", "sleep 30") if started
                                   else pipeline("echo hi"))
    listener_pass = asyncio.ensure_future(system.listener.run_once())
    await asyncio.wait_for(entered.wait(), 10)
    client.dead = True  # the actor dies now
    while "w1" in system.scheduler.registry:
        await system.scheduler.check_workers()
        await asyncio.sleep(0.05)
    gate.set()
    assert await listener_pass is Step.DISPATCHED
    await client.core.close()
    b = await system.store.get_build(build_id)
    if started:
        assert (b.status, b.reason) == ("error", WORKER_LOST)
    else:
        assert (b.status, b.worker) == ("pending", None)
        await system.add_worker("w2")
        builds = await system.pump([build_id])  # its new item: it runs, elsewhere
        assert (builds[build_id].status, builds[build_id].worker) == ("success", "w2")
    # Nothing is left running on the dead worker either way.
    assert await system.store.list_builds(status=[BuildStatus.RUNNING], worker="w1") == []


def recording(host: str, spawned: list[tuple[str, str]]):
    runtime = choose_runtime(allow_unsandboxed=False, network=False)
    real_spawn = runtime.spawn

    async def spawn(script, *, env, dirs):
        spawned.append((host, script))
        return await real_spawn(script, env=env, dirs=dirs)

    runtime.spawn = spawn  # type: ignore[method-assign]
    return runtime


@pytest.mark.parametrize("taken", [True, False])
async def test_a_package_whose_receipt_times_out_runs_once(system, taken):
    """The package went out and no answer came in time. Taken by the worker, the build
    stays there (sent elsewhere, its first step would run twice) and its start is
    recorded from a fresh copy; never taken, it is queued again after the grace."""
    spawned: list[tuple[str, str]] = []
    await system.add_worker("w1", runtime=recording("w1", spawned))
    await system.add_worker("w2", runtime=recording("w2", spawned))
    system.scheduler._call_timeout = 0.3
    delayed: list[str] = []
    for host in ("w1", "w2"):
        client = system.directory.clients[host]
        real = client._execute_package

        async def slow(package, real=real, host=host):
            if not delayed:
                delayed.append(host)
                if not taken:
                    await asyncio.sleep(1.0)  # lost on the way: the worker never sees it
                    return {"accepted": False, "reason": "too late"}
                receipt = await real(package)  # taken, its first step starting...
                await asyncio.sleep(1.0)       # ...but the answer comes too late
                return receipt
            return await real(package)

        client._execute_package = slow
    build_id = await system.submit(pipeline("echo step-one-side-effect", "true"))
    final = (await system.pump([build_id], timeout_s=30))[build_id]
    ones = [h for h, s in spawned if "step-one-side-effect" in s]
    assert final.status == BuildStatus.SUCCESS.value
    if taken:
        assert ones == delayed and final.worker == delayed[0] and final.attempts == 1
        assert final.started_at is not None  # from the fresh start
    else:
        assert len(ones) == 1  # once, wherever it was placed again


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)  # Redis: the volatile queue
async def test_a_build_being_dispatched_when_redis_restarts_empty_is_queued_again(system):
    """The resync after Redis lost its contents pushed every pending build but those being
    dispatched; a dispatch that then ended with the build still pending released an item
    Redis no longer had, and nothing ever queued the build again."""
    from vela.queue import Outcome

    await system.scheduler.resync_queue()  # its epoch known, nothing pending
    build_id = await system.submit(pipeline("echo hi"))
    res = await system.queue.reserve(["vela"], lease_s=30)
    item = system.listener.verifier.verify(res.payload, route="vela")
    # The listener's pass: no worker yet, so the Scheduler holds the build a while.
    waiting = asyncio.Event()
    wait = system.scheduler._changed_within

    async def changed_within(timeout_s: float) -> bool:
        waiting.set()
        return await wait(timeout_s)

    system.scheduler._changed_within = changed_within
    placing = asyncio.ensure_future(system.scheduler.submit_many([item]))
    await asyncio.wait_for(waiting.wait(), 10)
    assert build_id in system.scheduler._dispatching
    # Redis restarts empty meanwhile: its contents and its run id change.
    keys = [k async for k in system.queue._r.scan_iter(match=f"{system.queue.prefix}:*")]
    await system.queue._r.delete(*keys)
    epoch = await system.queue.epoch()

    async def restarted() -> str:
        return epoch + "-restarted"

    system.queue.epoch = restarted
    await system.scheduler.resync_queue()
    assert await placing == [Outcome.NO_CAPACITY]
    assert await system.queue.release(res) is False  # its item went with Redis
    await system.add_worker("w1")
    builds = await system.pump([build_id], timeout_s=10)
    assert builds[build_id].status == BuildStatus.SUCCESS.value


async def test_an_unanswered_package_to_a_worker_lost_meanwhile_is_queued_again(system):
    """The worker is declared lost while its package waits for an answer, which never
    comes: the build (its start unknown, as for any lost worker's build) is queued
    again, not kept for a worker that is gone."""
    await system.add_worker("w1")
    system.scheduler._call_timeout = 0.3
    client = system.directory.clients["w1"]
    entered = asyncio.Event()

    async def hung(package):
        entered.set()
        await asyncio.sleep(30)  # a hung worker: the call times out first
        return {"accepted": False, "reason": "too late"}

    client._execute_package = hung
    build_id = await system.submit(pipeline("echo hi"))
    listener_pass = asyncio.ensure_future(system.listener.run_once())
    await asyncio.wait_for(entered.wait(), 10)
    await system.scheduler.worker_lost("w1", "no answer")
    await listener_pass
    client.dead = True
    await system.add_worker("w2")
    builds = await system.pump([build_id], timeout_s=10)
    assert (builds[build_id].status, builds[build_id].worker) == ("success", "w2")


async def _lost_while_receipt_on_the_way(system, pipeline_text: str):
    """w1 takes the build; its receipt waits on the returned gate."""
    core = await system.add_worker("w1")
    client = system.directory.clients["w1"]
    gate, entered = asyncio.Event(), asyncio.Event()
    real = client._execute_package

    async def slow(package):
        receipt = await real(package)  # taken, started...
        entered.set()
        await gate.wait()              # ...its answer on the way
        return receipt

    client._execute_package = slow
    build_id = await system.submit(pipeline_text)
    listener_pass = asyncio.ensure_future(system.listener.run_once())
    await asyncio.wait_for(entered.wait(), 10)
    return core, client, gate, build_id, listener_pass


async def test_a_receipt_from_a_worker_lost_and_back_goes_on_there(system):
    """A transient silence: the worker is lost and registers again, naming the build it
    runs, before its receipt arrives. Its adoption skipped the build (being dispatched);
    the receipt must not end what the worker runs."""
    from vela.security import Registration

    core, _, gate, build_id, listener_pass = await _lost_while_receipt_on_the_way(
        system, pipeline("echo hi", "sleep 0.5"))
    await system.scheduler.worker_lost("w1", "no answer")
    identity = system.identity("w1")
    token = await system.authority.registration_token(routes=["vela"], hostname="w1")
    registration = Registration(hostname="w1", routes=["vela"], build_limit=1,
                                sign_public_key=identity.sign_public_key,
                                seal_public_key=identity.seal_public_key,
                                actor_name="vela-worker-w1")
    await system.scheduler.register(registration.model_dump(mode="json"), token=token,
                                    running=core.started)
    gate.set()
    await listener_pass
    assert system.scheduler.registry.get("w1").running == {build_id}
    builds = await system.pump([build_id], timeout_s=15)
    assert (builds[build_id].status, builds[build_id].reason) == ("success", None)


async def test_a_receipt_from_a_lost_worker_is_settled_later_if_the_database_fails(
        system, monkeypatch):
    from sqlalchemy.exc import OperationalError

    _, client, gate, build_id, listener_pass = await _lost_while_receipt_on_the_way(
        system, pipeline("echo hi", "sleep 30"))
    client.dead = True
    while "w1" in system.scheduler.registry:
        await system.scheduler.check_workers()
        await asyncio.sleep(0.05)
    get_build = system.store.get_build
    failed: list[int] = []

    async def flaky(build_id: int):
        if not failed:
            failed.append(build_id)
            raise OperationalError("SELECT", {}, Exception("connection reset"))
        return await get_build(build_id)

    monkeypatch.setattr(system.store, "get_build", flaky)
    gate.set()
    await listener_pass
    await client.core.close()
    assert failed
    builds = await system.pump([build_id], timeout_s=10)
    # It had started there (its receipt said so): it ends, it is not run again.
    assert (builds[build_id].status, builds[build_id].reason) == ("error", WORKER_LOST)
    assert not system.scheduler._started_unrecorded and not system.scheduler._unsettled


async def test_the_started_mark_survives_an_adoption_the_database_refuses(system,
                                                                          monkeypatch):
    """A build started on w1 with no start recorded (marked so); w1 comes back naming it,
    but writing its start fails: lost for good after that, it must end, not run again."""
    from sqlalchemy.exc import OperationalError

    await system.add_worker("w1")
    build_id = await system.submit(pipeline("echo started", "sleep 30"))
    await system.pump([build_id], until=lambda b: b[build_id].started_at is not None)
    scheduler = system.scheduler
    await system.store.set_build_fields(build_id, started_at=None)  # not recorded
    scheduler._started_unrecorded.add(build_id)
    real = system.store.set_build_fields

    async def refused(*args, **kwargs):
        raise OperationalError("UPDATE", {}, Exception("connection reset"))

    monkeypatch.setattr(system.store, "set_build_fields", refused)
    with pytest.raises(OperationalError):
        await scheduler._adopt("w1", {build_id})
    monkeypatch.setattr(system.store, "set_build_fields", real)
    await scheduler._end_lost_build(await system.store.get_build(build_id))
    build = await system.store.get_build(build_id)
    assert (build.status, build.reason) == ("error", WORKER_LOST)
    await system.directory.clients["w1"].core.close()
