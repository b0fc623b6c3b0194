"""Builds end to end through the server's logic (no Ray): listener → scheduler →
challenge → authority → sealed package → worker → reports → database."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime

import pytest

from tests.server.conftest import HELLO, pipeline, report_one
from vela.coalesce import MAX_BATCH as MAX_REQUESTS
from vela.domain import BuildStatus
from vela.errors import NotFound
from vela.queue.item import QueueItem
from vela.queue.listener import Outcome, Step
from vela.security import (
    BuildAction,
    Reason,
    Registration,
    Rejected,
    hash_registration_token,
    make_proof,
    reports_hash,
)
from vela.security.onboarding import WORKER_PROTOCOL
from vela.server.reports import MAX_BATCH
from vela.server.scheduler import WORKER_LOST

SECRET = "s3cr3t-Value-42"


async def logs_of(system, build_id: int) -> str:
    return "".join(text for _, _, text in await system.store.get_logs(build_id))


def signed(identity, *, token: str, build_id: int, reports: list[tuple[str, dict]]
           ) -> tuple[str, list[dict]]:
    """A report call as a worker makes it: one fresh proof over ``reports`` (their
    actions and payloads, in order), and the reports as they go on the wire."""
    proof = make_proof(identity, token=token, reports=reports, build_id=build_id,
                       now=datetime.now(UTC))
    return proof, [{"action": action, "payload": payload} for action, payload in reports]


async def test_build_runs_with_secret_masked(system):
    await system.add_worker("w1")
    build_id = await system.submit(HELLO, secrets={"api_token": SECRET})
    build = (await system.pump([build_id]))[build_id]
    assert build.status == "success", (build.reason, build.message)
    assert build.worker == "w1" and build.attempts == 1
    for t in ("enqueued_at", "dispatched_at", "started_at", "finished_at"):
        assert getattr(build, t) is not None, t
    assert build.enqueued_at <= build.dispatched_at <= build.started_at <= build.finished_at
    steps = await system.store.get_steps(build_id)
    assert [(s.name, s.status) for s in steps] == [("greet", "success"), ("check", "success")]
    assert all(s.started_at and s.finished_at for s in steps)
    text = await logs_of(system, build_id)
    assert "token is ***" in text and "done" in text
    assert SECRET not in text
    assert base64.b64encode(SECRET.encode() + b"\n").decode().rstrip("=") not in text


async def test_failing_step_fails_the_build(system):
    await system.add_worker("w1")
    build_id = await system.submit(pipeline("echo before", "exit 3"))
    build = (await system.pump([build_id]))[build_id]
    assert build.status == "failure"
    (step,) = await system.store.get_steps(build_id)
    assert step.status == "failure" and step.exit_code == 3


async def test_routes_are_respected(system):
    await system.add_worker("cpu", routes=("vela",))
    await system.add_worker("gpu", routes=("gpu",))
    ids = [await system.submit(pipeline("true"), route=r) for r in ("vela", "gpu") * 3]
    builds = await system.pump(ids)
    for b in builds.values():
        assert b.status == "success"
        assert b.worker == ("gpu" if b.route == "gpu" else "cpu")


async def test_build_limit_never_exceeded_under_50_builds(system):
    cores = [await system.add_worker(f"w{i}", build_limit=2) for i in range(3)]
    peak = {c.hostname: 0 for c in cores}

    def watch(builds):
        for c in cores:
            peak[c.hostname] = max(peak[c.hostname], len(c.running))
            assert len(c.running) <= 2
        for e in system.scheduler.registry.workers():
            assert e.load <= e.build_limit
        return all(BuildStatus(b.status).terminal for b in builds.values())

    # Long enough that all six slots fill even on a busy machine.
    ids = [await system.submit(pipeline("sleep 1")) for _ in range(50)]
    builds = await system.pump(ids, timeout_s=180, until=watch)
    assert all(b.status == "success" for b in builds.values())
    assert max(peak.values()) == 2
    assert system.scheduler.registry.free_slots() == {"vela": 6}


async def test_no_worker_leaves_the_item_queued(system):
    build_id = await system.submit(pipeline("true"))
    for _ in range(3):
        await system.listener.run_once()
    assert (await system.store.get_build(build_id)).status == "pending"
    depth = await system.queue.depth()
    assert depth["vela"].ready == 1
    await system.add_worker("late")
    assert (await system.pump([build_id]))[build_id].status == "success"


async def test_redelivered_item_of_a_dispatched_build_is_not_run_twice(system):
    core = await system.add_worker("w1")
    build_id = await system.submit(pipeline("true"))
    await system.pump([build_id])
    await core.wait_idle(10)
    waiting = await system.submit(pipeline("true"))  # pending, on route vela
    again = await system.scheduler.submit_many([QueueItem.new(build_id, "vela"),
                                                QueueItem.new(build_id + 99, "vela"),
                                                QueueItem.new(waiting, "gpu")])
    assert again[0] is Outcome.NOT_PENDING
    assert [(r.outcome, r.reason) for r in again[1:]] == [  # type: ignore[union-attr]
        (Outcome.REJECTED, "build_not_found"), (Outcome.REJECTED, "route_mismatch")]
    assert core.running == []


async def test_worker_killed_mid_build_ends_worker_lost_and_token_dies(system):
    await system.add_worker("w1")
    await system.add_worker("w2")
    slow = await system.submit(pipeline("echo started", "sleep 30"))
    await system.pump([slow], until=lambda b: b[slow].started_at is not None)
    victim = (await system.store.get_build(slow)).worker
    token = system.tokens[slow]
    await system.directory.clients[victim].kill()
    builds = await system.pump([slow])
    assert builds[slow].status == "error" and builds[slow].reason == WORKER_LOST
    # The token of the ended build is dead, even with a valid fresh proof.
    forged = {"number": 1, "lines": ["forged"]}
    proof = make_proof(system.identity(victim), token=token,
                       reports=[(BuildAction.LOG_APPEND, forged)], build_id=slow,
                       now=datetime.now(UTC))
    with pytest.raises(Rejected) as e:
        await report_one(system.scheduler, build_id=slow, action=BuildAction.LOG_APPEND,
                         payload=forged, token=token, proof=proof)
    assert e.value.reason is Reason.BUILD_ENDED
    assert "forged" not in await logs_of(system, slow)
    # Other builds still flow on the surviving worker.
    nxt = await system.submit(pipeline("true"))
    final = (await system.pump([nxt]))[nxt]
    assert final.status == "success" and final.worker != victim


async def test_dispatched_but_never_started_goes_back_to_the_queue(system):
    await system.add_worker("w1")
    build_id = await system.submit(pipeline("true"))
    # Dispatch by hand up to the recorded state, then lose the worker before START.
    build = await system.store.get_build(build_id)
    issued = await system.authority.issue_package(build_id, "w1")
    await system.store.transition_build(build_id, BuildStatus.PENDING, BuildStatus.RUNNING,
                                        worker="w1", token_jti=issued.jti,
                                        attempts=build.attempts + 1)
    await system.listener.queue.reclaim_expired()
    await system.directory.clients["w1"].kill()
    await system.scheduler.worker_lost("w1", "test")
    build = await system.store.get_build(build_id)
    assert build.status == "pending" and build.worker is None and build.token_jti is None
    await system.add_worker("w2")
    final = (await system.pump([build_id]))[build_id]
    assert final.status == "success" and final.worker == "w2"


async def test_scheduler_restart_adopts_running_builds(system):
    await system.add_worker("w1", build_limit=2)
    ids = [await system.submit(pipeline("sleep 1")) for _ in range(2)]
    await system.pump(ids, until=lambda b: all(x.started_at for x in b.values()))
    await system.restart_scheduler()
    entry = system.scheduler.registry.get("w1")
    assert entry is not None and entry.running == set(ids)
    builds = await system.pump(ids)
    assert all(b.status == "success" and b.attempts == 1 for b in builds.values())
    assert system.scheduler.registry.free_slots() == {"vela": 2}


async def one_running_one_held(system, running: str, held: str):
    """A worker with one slot and a backlog of one, running ``running`` and holding
    ``held``: (its core, the running build, the held build)."""
    core = await system.add_worker("w1", build_limit=1, backlog=1)
    first = await system.submit(pipeline(running))
    await system.pump([first], until=lambda b: b[first].started_at is not None)
    second = await system.submit(pipeline(held))
    await system.pump([second], until=lambda b: b[second].status == "running")
    assert core.status()["held"] == [second]
    return core, first, second


async def test_a_restarted_scheduler_queues_held_builds_again(system):
    """A new Scheduler adopts what a worker runs, but not what it holds: a held build
    goes back to the queue (its token dies, so the held copy never starts) and runs
    once, later."""
    core, slow, held = await one_running_one_held(system, "sleep 3", "echo held-once")
    await system.restart_scheduler()
    entry = system.scheduler.registry.get("w1")
    assert entry is not None and entry.running == {slow}
    assert entry.backlog == 1  # read back from the worker's status
    requeued = await system.store.get_build(held)
    assert requeued.status == "pending" and requeued.token_jti is None
    builds = await system.pump([slow, held])
    assert builds[slow].status == "success" and builds[slow].attempts == 1
    # Dispatched again (twice, if the worker still held the stale copy and refused).
    assert builds[held].status == "success" and builds[held].attempts >= 2
    assert (await logs_of(system, held)).count("held-once") == 1

async def test_the_worker_row_and_its_api_view_carry_the_backlog(system):
    """The backlog a worker registers is stored with it and shown by the API (and so
    by `vela workers`); a worker without one shows none."""
    from vela.api.backend import worker_out

    await system.add_worker("w1", build_limit=2, backlog=3)
    await system.add_worker("w2", build_limit=1)
    rows = {h: await system.store.get_worker(h) for h in ("w1", "w2")}
    assert (rows["w1"].build_limit, rows["w1"].backlog) == (2, 3)
    assert rows["w2"].backlog == 0
    assert worker_out(rows["w1"], connected=True)["backlog"] == 3


async def test_a_restarted_scheduler_records_the_start_it_missed(system):
    """The Scheduler went down after a worker accepted a build but before it recorded
    the start in the receipt: the new one adopts the running build as started (were
    its worker lost later, it would end ``worker_lost``, not run a second time)."""
    await system.add_worker("w1")
    client = system.directory.clients["w1"]
    honest = client.execute_package

    async def start_lost(package: dict) -> dict:
        return {**await honest(package), "start": None}

    client.execute_package = start_lost  # type: ignore[method-assign]
    build_id = await system.submit(pipeline("echo begun", "sleep 2"))
    await system.pump([build_id], until=lambda b: b[build_id].status == "running")
    assert (await system.store.get_build(build_id)).started_at is None
    await system.restart_scheduler()
    assert (await system.store.get_build(build_id)).started_at is not None
    assert (await system.pump([build_id]))[build_id].status == "success"


async def test_a_prefetched_build_takes_the_next_slot_that_frees(system):
    """The listener takes more items than there are free slots (``scheduler.prefetch``);
    one without a slot waits in the Scheduler and takes the slot the first build frees,
    within the same pass, without going back to the queue."""
    system.settings.scheduler.prefetch_wait_s = 10.0
    await system.add_worker("w1")
    first, second = [await system.submit(pipeline("true")) for _ in range(2)]
    assert await system.listener.run_once() == Step.DISPATCHED
    assert system.listener.stats.dispatched == 2 and system.listener.stats.released == 0
    second_build = await system.store.get_build(second)
    assert second_build.status in ("running", "success")
    assert second_build.dispatched_at >= (await system.store.get_build(first)).finished_at
    await system.pump([first, second])


async def test_a_prefetched_build_without_a_slot_goes_back_to_the_queue(system):
    system.settings.scheduler.prefetch_wait_s = 0.05
    await system.add_worker("w1")
    slow = await system.submit(pipeline("sleep 30"))
    waiting = await system.submit(pipeline("true"))
    await system.listener.run_once()
    assert system.listener.stats.dispatched == 1 and system.listener.stats.released == 1
    assert (await system.store.get_build(waiting)).status == "pending"
    assert (await system.listener.queue.depth())["vela"].ready == 1
    await system.scheduler.cancel(slow)
    assert (await system.pump([waiting]))[waiting].status == "success"



async def test_a_worker_with_a_backlog_is_sent_builds_beyond_its_slots(system):
    """``worker.backlog``: the Scheduler places builds on a worker whose slots are taken
    (after every worker with a slot free); the worker holds them and starts each when
    a slot frees, so none goes back to the queue and each runs once."""
    core = await system.add_worker("w1", build_limit=1, backlog=2)
    ids = [await system.submit(pipeline("sleep 2")) for _ in range(3)]
    # Its start is recorded after the receipt: wait for that too.
    builds = await system.pump(ids, until=lambda b: all(x.status == "running"
                                                        for x in b.values())
                               and any(x.started_at for x in b.values()))
    started = [b for b, x in builds.items() if x.started_at is not None]
    assert len(started) == 1
    assert core.status()["held"] == sorted(set(ids) - set(started))
    entry = system.scheduler.registry.get("w1")
    assert entry is not None and entry.load == 3 and entry.free == 0
    builds = await system.pump(ids)
    assert all(b.status == "success" and b.attempts == 1 for b in builds.values())
    assert system.listener.stats.released == 0


async def test_a_worker_with_a_free_slot_goes_before_a_backlog(system):
    await system.add_worker("full", build_limit=1, backlog=1)
    first = await system.submit(pipeline("sleep 30"))
    await system.pump([first], until=lambda b: b[first].started_at is not None)
    await system.add_worker("free", build_limit=1)
    nxt = await system.submit(pipeline("true"))
    assert (await system.pump([nxt]))[nxt].worker == "free"
    await system.scheduler.cancel(first)


async def test_a_held_build_given_up_goes_back_to_the_queue(system):
    """A held build waits at most half its token's grace; given up unstarted, it is
    queued again as soon as the Scheduler's health check sees it listed as given up
    (not after the grace for builds gone without a word), and runs later."""
    system.settings.tokens.build_token_grace_s = 2
    system.settings.scheduler.worker_lost_after_s = 600
    system.settings.scheduler.health_check_period_s = 0.05
    core = await system.add_worker("w1", build_limit=1, backlog=1)
    slow = await system.submit(pipeline("sleep 30"))
    await system.pump([slow], until=lambda b: b[slow].started_at is not None)
    held = await system.submit(pipeline("true"))
    await system.pump([held], until=lambda b: b[held].attempts >= 2)
    assert system.scheduler.stats.requeued >= 1
    assert (await system.store.get_build(held)).started_at is None
    await system.scheduler.cancel(slow)
    final = (await system.pump([held]))[held]
    assert final.status == "success" and final.worker == "w1"
    await core.wait_idle(10)


async def test_a_health_check_asked_before_a_placement_says_nothing_of_that_build(system):
    """A worker's health check answer can come back after the Scheduler placed a build
    there: asked before, it cannot speak for that build. Here the late answer names the
    build as given up, as an answer about an earlier held copy of it would; the build
    is neither queued again nor ended, and runs once."""
    system.settings.scheduler.worker_lost_after_s = 600
    core = await system.add_worker("w1", build_limit=1, backlog=1)
    client = system.directory.clients["w1"]
    honest, asked, release, answered = client.status, asyncio.Event(), asyncio.Event(), []

    async def late_status() -> dict:
        before = core.status()  # taken now: the build does not exist yet
        asked.set()
        await release.wait()
        return {**before, "given_up": answered}

    client.status = late_status
    await system.scheduler.check_workers()
    await asyncio.wait_for(asked.wait(), 5)
    build_id = await system.submit(pipeline("sleep 1", "echo ran"))
    answered.append(build_id)
    await system.pump([build_id], until=lambda b: b[build_id].started_at is not None)
    client.status = honest
    release.set()
    final = (await system.pump([build_id]))[build_id]
    assert (final.status, final.attempts) == ("success", 1)
    assert system.scheduler.stats.requeued == 0
    assert (await logs_of(system, build_id)).count("ran") == 1
    await core.wait_idle(10)


async def test_canceling_a_held_build_drops_it_on_its_worker(system):
    core, slow, held = await one_running_one_held(system, "sleep 30", "echo never")
    assert await system.scheduler.cancel(held) is BuildStatus.CANCELED
    await eventually_idle(core, held)
    assert core.status()["held"] == [] and core.running == [slow]
    assert "never" not in await logs_of(system, held)
    await system.scheduler.cancel(slow)
    await core.wait_idle(10)

async def test_cancel_running_build(system):
    core = await system.add_worker("w1")
    build_id = await system.submit(pipeline("sleep 30"))
    await system.pump([build_id], until=lambda b: b[build_id].started_at is not None)
    assert await system.scheduler.cancel(build_id) is BuildStatus.CANCELED
    await core.wait_idle(10)
    build = await system.store.get_build(build_id)
    assert build.status == "canceled"
    assert system.scheduler.registry.free_slots() == {"vela": 1}


@pytest.mark.parametrize("moved_on", ["canceled", "dispatched_again"])
async def test_reports_are_checked_against_the_row_in_their_own_transaction(system,
                                                                            moved_on):
    """A good token and a fresh proof pass the TokenAuthority, but the build's row, read
    in the transaction that would write the reports, refuses them once the build has
    moved on: nothing is written."""
    await system.add_worker("w1")
    a = await system.submit(pipeline("sleep 30"))
    await system.pump([a], until=lambda x: x[a].started_at is not None)
    token, me = system.tokens[a], system.identity("w1")
    late = [(BuildAction.LOG_APPEND, {"number": 1, "seq": 99, "lines": ["too-late"]})]

    if moved_on == "canceled":
        await system.scheduler.cancel(a)
        expected = Reason.BUILD_ENDED
    else:  # the row holds another token now
        await system.store.set_build_fields(a, token_jti="another-jti")
        expected = Reason.TOKEN_REVOKED
    proof, _ = signed(me, token=token, build_id=a, reports=late)
    claims = await system.authority.verify(build_id=a, token=token, proof=proof,
                                           reports_digest=reports_hash(late))
    assert claims.wkr == "w1"  # the token and the proof themselves are good
    proof, reports = signed(me, token=token, build_id=a, reports=late)  # a fresh one
    with pytest.raises(Rejected) as e:
        await system.scheduler.reports(build_id=a, token=token, proof=proof, reports=reports)
    assert e.value.reason is expected
    assert "too-late" not in await logs_of(system, a)
    await system.scheduler.cancel(a)


@pytest.mark.parametrize("forgery", ["garbage", "other_build", "no_proof"])
async def test_forged_reports_are_rejected(system, forgery):
    await system.add_worker("w1")
    a = await system.submit(pipeline("sleep 30"))
    b = await system.submit(pipeline("sleep 30"), repo="acme/other")
    await system.pump([a], until=lambda x: x[a].started_at is not None)
    token = system.tokens[a]
    identity = system.identity("w1")
    now = datetime.now(UTC)
    if forgery == "garbage":
        tok, proof, target = "x.y.z", "a.b.c", a
    elif forgery == "other_build":
        tok, target = token, b
        proof = make_proof(identity, token=token,
                           reports=[(BuildAction.FINISH, {"status": "success"})],
                           build_id=b, now=now)
    else:
        tok, proof, target = token, "", a
    with pytest.raises(Rejected):
        await report_one(system.scheduler, build_id=target, action=BuildAction.FINISH,
                         payload={"status": "success"}, token=tok, proof=proof)
    assert (await system.store.get_build(b)).status == "pending"
    assert (await system.store.get_build(a)).status == "running"
    await system.scheduler.cancel(a)
    await system.scheduler.cancel(b)


@pytest.mark.parametrize("spent_by", ["authority_restart", "failed_write"])
async def test_a_start_whose_proof_went_stale_is_signed_afresh_by_its_worker(
        system, monkeypatch, spent_by):
    """The receipt's start could not be recorded while its proof was fresh: the
    TokenAuthority restarted (its replay window starts anew: proofs made before are
    stale), or the first write failed after the check (the same proof again is a
    replay). The Scheduler asks the worker for the start with a fresh proof; the build
    runs on, once."""
    await system.add_worker("w1")
    client = system.directory.clients["w1"]
    honest = client._execute_package
    replay = system.authority.guard.replay

    async def then_trouble(package: dict) -> dict:
        receipt = await honest(package)
        if spent_by == "authority_restart":  # as a new TokenAuthority's window starts
            await asyncio.sleep(0.01)
            replay.floor = datetime.now(UTC).timestamp()
        return receipt

    client._execute_package = then_trouble  # type: ignore[method-assign]
    if spent_by == "failed_write":
        writer = system.scheduler.writer
        apply_all = writer.apply_all
        failed: list[int] = []

        async def fails_once(**kw):
            if not failed:
                failed.append(kw["build_id"])
                raise OSError("the database went away")
            return await apply_all(**kw)

        monkeypatch.setattr(writer, "apply_all", fails_once)
    build_id = await system.submit(pipeline("echo once"))
    build = (await system.pump([build_id]))[build_id]
    assert build.status == "success", (build.reason, build.message)
    assert build.started_at is not None and build.attempts == 1
    assert (await logs_of(system, build_id)).count("once") == 1
    # Only proofs were refused (the worker's reports in flight at the "restart" too,
    # which it signed afresh), each build's once or more, never the build.
    refused = system.scheduler.stats.report_rejections
    assert set(refused) == {{"authority_restart": "proof_stale",
                             "failed_write": "proof_replayed"}[spent_by]}, refused


@pytest.mark.parametrize("forgery", ["tampered", "other_build", "no_proof", "replayed",
                                     "payload_changed"])
async def test_a_forged_start_in_the_receipt_ends_the_build(system, forgery):
    """The start (``{reports, proof}``) comes back with the receipt of
    ``execute_package``; it is checked like any report call. A forged one ends the build
    ``error`` with the reason, frees the slot and stops the build on the worker, whose
    later reports are refused."""
    core = await system.add_worker("w1", build_limit=2)
    client = system.directory.clients["w1"]
    honest = client.execute_package
    seen: list[dict] = []

    async def forging(package: dict) -> dict:
        receipt = await honest(package)
        start = receipt["start"]
        seen.append(dict(start))
        if forgery == "tampered":
            start["proof"] = start["proof"][:-4] + ("AAAA" if start["proof"][-4:] != "AAAA"
                                                    else "BBBB")
        elif forgery == "other_build":
            start["proof"] = make_proof(system.identity("w1"), token=package["build_token"],
                                        reports=[(r["action"], r["payload"])
                                                 for r in start["reports"]],
                                        build_id=package["build_id"] + 1,
                                        now=datetime.now(UTC))
        elif forgery == "no_proof":
            del start["proof"]
        elif forgery == "payload_changed":  # the start time, rewritten after signing
            start["reports"] = [{**r, "payload": {**r["payload"],
                                                  "started_at": "2000-01-01T00:00:00+00:00"}}
                                for r in start["reports"]]
        elif len(seen) > 1:  # replayed: the first build's start, proof and all
            receipt["start"] = seen[0]
        return receipt

    client.execute_package = forging  # type: ignore[method-assign]
    if forgery == "replayed":
        first = await system.submit(pipeline("sleep 30"))
        await system.pump([first], until=lambda b: b[first].started_at is not None)
    build_id = await system.submit(pipeline("sleep 30"))
    build = (await system.pump([build_id]))[build_id]
    assert build.status == "error" and build.started_at is None
    assert build.reason == {"tampered": "proof_invalid", "other_build": "wrong_build",
                            "no_proof": "malformed", "replayed": "proof_invalid",
                            "payload_changed": "proof_wrong_action"}[forgery]
    assert "refused" in (build.message or "")
    await eventually_idle(core, build_id)
    assert sum(system.scheduler.stats.report_rejections.values()) >= 1
    assert build_id not in system.scheduler.registry.get("w1").running
    assert (await system.store.get_build(build_id)).status == "error"  # nothing overwrote it
    if forgery == "replayed":
        await system.scheduler.cancel(first)


async def eventually_idle(core, build_id: int) -> None:
    for _ in range(200):
        if build_id not in core.running:
            return
        await asyncio.sleep(0.05)  # poll with a deadline
    raise AssertionError(f"build {build_id} still runs on the worker")


BAD_BATCHES = ["forged", "other_workers_key", "replayed", "action_swapped", "one_dropped",
               "one_added", "reordered", "finish_not_last", "start_not_first", "too_many",
               "empty", "not_a_list"]
# Why each bad call is refused.
BAD_BATCH_REASONS = {"forged": Reason.PROOF_INVALID, "other_workers_key": Reason.PROOF_INVALID,
                     "replayed": Reason.PROOF_REPLAYED,
                     **dict.fromkeys(["action_swapped", "one_dropped", "one_added",
                                      "reordered"], Reason.PROOF_WRONG_ACTION),
                     **dict.fromkeys(["finish_not_last", "start_not_first", "too_many",
                                      "empty", "not_a_list"], Reason.MALFORMED)}


@pytest.mark.parametrize("bad", BAD_BATCHES)
async def test_a_batch_of_reports_passes_whole_or_not_at_all(system, bad):
    """Reports sent together are all checked before any is written: a forged or
    replayed proof, a proof made over other reports (one swapped, dropped, added or
    moved), or a misplaced report refuses the lot."""
    await system.add_worker("w1")
    await system.add_worker("w2", routes=("other",))
    a = await system.submit(pipeline("sleep 30"))
    await system.pump([a], until=lambda x: x[a].started_at is not None)
    token, me = system.tokens[a], system.identity("w1")

    def proof(reports: list[tuple[str, dict]], *, signer=me) -> str:
        return make_proof(signer, token=token, reports=reports, build_id=a,
                          now=datetime.now(UTC))

    def log(text: str, seq: int) -> tuple[str, dict]:
        return (BuildAction.LOG_APPEND, {"number": 1, "seq": seq, "lines": [text]})

    logs = [log("batched-1", 1), log("batched-2", 2)]
    finish = (BuildAction.FINISH, {"status": "success"})
    start = (BuildAction.START, {})
    spent = proof(logs)
    if bad == "replayed":  # its proof already taken by the Authority, for another call
        await system.authority.verify(build_id=a, token=token, proof=spent,
                                      reports_digest=reports_hash(logs))
    swapped = (BuildAction.LOG_APPEND, {"number": 1, "lines": ["batched-x"]})
    many = [log(f"batched-{i}", i) for i in range(1, MAX_BATCH + 2)]
    # (the reports sent, the call's proof)
    sent, call_proof = {
        "forged": ([*logs, finish], "a.b.c"),
        "other_workers_key": ([*logs, finish],
                              proof([*logs, finish], signer=system.identity("w2"))),
        "replayed": (logs, spent),
        "action_swapped": ([logs[0], swapped],
                           proof([logs[0], (BuildAction.FINISH, swapped[1])])),
        "one_dropped": (logs[:1], proof(logs)),
        "one_added": ([*logs, finish], proof(logs)),
        "reordered": (logs[::-1], proof(logs)),
        "finish_not_last": ([finish, logs[0]], proof([finish, logs[0]])),
        "start_not_first": ([logs[0], start], proof([logs[0], start])),
        "too_many": (many, proof(many)),
        "empty": ([], proof([])),
        "not_a_list": (logs[:1], proof(logs[:1])),
    }[bad]
    reports: object = [{"action": action, "payload": payload} for action, payload in sent]
    if bad == "not_a_list":
        reports = reports[0]  # type: ignore[index]
    with pytest.raises(Rejected) as e:
        await system.scheduler.reports(build_id=a, token=token, proof=call_proof,
                                       reports=reports)  # type: ignore[arg-type]
    assert e.value.reason is BAD_BATCH_REASONS[bad]
    assert "batched-" not in await logs_of(system, a)
    assert (await system.store.get_build(a)).status == "running"
    assert sum(system.scheduler.stats.report_rejections.values()) == 1
    # The build's own reports still go through together, with a fresh proof over them.
    ok = [log("ok-1", 1), log("ok-2", 2)]
    call_proof, reports = signed(me, token=token, build_id=a, reports=ok)
    await system.scheduler.reports(build_id=a, token=token, proof=call_proof,
                                   reports=reports)
    assert "ok-1\nok-2" in await logs_of(system, a)
    await system.scheduler.cancel(a)


async def test_a_batch_is_written_whole_or_not_at_all(system):
    """Authorized reports whose last one cannot apply (a step that cannot go back to
    running): the batch is refused and none of it is written."""
    await system.add_worker("w1")
    a = await system.submit(pipeline("sleep 30"))
    await system.pump([a], until=lambda x: x[a].started_at is not None)
    token, me = system.tokens[a], system.identity("w1")

    for _ in range(500):  # the worker's "running" report for step 1 (it may linger)
        if (await system.store.get_steps(a))[0].status == "running":
            break
        await asyncio.sleep(0.01)
    done = (BuildAction.STEP_UPDATE, {"number": 1, "status": "success", "exit_code": 0})
    back = (BuildAction.STEP_UPDATE, {"number": 1, "status": "running"})
    logged = (BuildAction.LOG_APPEND, {"number": 1, "seq": 90, "lines": ["not-kept"]})
    proof, reports = signed(me, token=token, build_id=a, reports=[logged, done, back])
    with pytest.raises(Rejected) as e:
        await system.scheduler.reports(build_id=a, token=token, proof=proof, reports=reports)
    assert e.value.reason is Reason.MALFORMED
    assert "not-kept" not in await logs_of(system, a)
    assert (await system.store.get_steps(a))[0].status == "running"
    await system.scheduler.cancel(a)


async def test_a_report_changed_after_signing_is_refused(system):
    """The proof binds the reports' payloads, not only their actions: a ``build.finish``
    the worker signed as ``failure``, turned into ``success`` on its way, is refused
    (``proof_wrong_action``) and nothing is written; the report as signed goes through."""
    await system.add_worker("w1")
    a = await system.submit(pipeline("sleep 30"))
    await system.pump([a], until=lambda x: x[a].started_at is not None)
    token, me = system.tokens[a], system.identity("w1")
    before = await system.store.get_build(a)
    proof, reports = signed(me, token=token, build_id=a,
                            reports=[(BuildAction.FINISH, {"status": "failure"})])
    flipped = [{**reports[0], "payload": {"status": "success"}}]  # in transit
    with pytest.raises(Rejected) as e:
        await system.scheduler.reports(build_id=a, token=token, proof=proof, reports=flipped)
    assert e.value.reason is Reason.PROOF_WRONG_ACTION
    after = await system.store.get_build(a)
    assert after.status == "running" and after.finished_at is None
    assert (after.reason, after.message) == (before.reason, before.message)
    assert system.scheduler.stats.report_rejections == {"proof_wrong_action": 1}
    assert system.metrics.rejections == {"proof_wrong_action": 1}
    # The worker's own report, as it signed it (with a fresh proof), ends the build.
    proof, reports = signed(me, token=token, build_id=a,
                            reports=[(BuildAction.FINISH, {"status": "failure"})])
    await system.scheduler.reports(build_id=a, token=token, proof=proof, reports=reports)
    assert (await system.store.get_build(a)).status == "failure"


async def test_the_authority_checks_a_calls_proof_against_its_reports(system):
    """The TokenAuthority does not rely on the Scheduler's parsing: a call's proof must
    be fresh and made over exactly the reports that hash to the digest it is given (the
    same actions and payloads, in the same order, none dropped or added), a request
    must name that digest, and each call counts once."""
    await system.add_worker("w1")
    a = await system.submit(pipeline("sleep 30"))
    await system.pump([a], until=lambda x: x[a].started_at is not None)
    token, me = system.tokens[a], system.identity("w1")

    def proof(reports: list[tuple[str, dict]]) -> str:
        return make_proof(me, token=token, reports=reports, build_id=a, now=datetime.now(UTC))

    log = (BuildAction.LOG_APPEND, {"number": 1, "seq": 9, "lines": ["x"]})
    step = (BuildAction.STEP_UPDATE, {"number": 1, "status": "running"})
    ok = [log, step]
    for sent, signed_over in [
        ([log], [(BuildAction.FINISH, log[1])]),             # made for another action
        ([log], [(log[0], {**log[1], "lines": ["y"]})]),     # made for another payload
        ([step, log], ok),                                   # in another order
        ([log], ok),                                         # one report dropped
        ([*ok, log], ok),                                    # one report added
    ]:
        with pytest.raises(Rejected) as e:
            await system.authority.verify(build_id=a, token=token, proof=proof(signed_over),
                                          reports_digest=reports_hash(sent))
        assert e.value.reason is Reason.PROOF_WRONG_ACTION
    p = proof(ok)
    answers = await system.authority.verify_many([
        {"build_id": a, "token": token, "proof": p},                          # no digest
        {"build_id": a, "token": token, "proof": p, "reports_digest": ok},    # not a digest
        {"build_id": a, "token": token, "reports_digest": reports_hash(ok)},  # no proof
        {"build_id": a, "token": token, "requests": [(log[0], p)]},           # per report
    ])
    assert [getattr(r, "reason", r) for r in answers] == [Reason.MALFORMED] * 4
    with pytest.raises(Rejected) as e:
        await system.authority.verify(build_id=a, token=token, proof="",
                                      reports_digest=reports_hash(ok))
    assert e.value.reason is Reason.PROOF_MISSING
    verified = system.authority.stats.verified
    claims = await system.authority.verify(build_id=a, token=token, proof=p,
                                           reports_digest=reports_hash(ok))
    assert claims.wkr == "w1"
    assert system.authority.stats.verified == verified + 1  # one call, however many reports
    with pytest.raises(Rejected) as e:  # and never twice
        await system.authority.verify(build_id=a, token=token, proof=p,
                                      reports_digest=reports_hash(ok))
    assert e.value.reason is Reason.PROOF_REPLAYED
    await system.scheduler.cancel(a)


async def test_a_batch_of_report_checks_answers_each_on_its_own(system):
    """Reports of several builds checked in one call (how the Scheduler sends them
    under load): a forged, swapped, replayed or malformed request is refused without
    the good ones in the same call failing or passing with it."""
    await system.add_worker("w1")
    await system.add_worker("w2")
    a = await system.submit(pipeline("sleep 30"))
    b = await system.submit(pipeline("sleep 30"))
    builds = await system.pump([a, b], until=lambda x: all(
        x[i].started_at is not None for i in (a, b)))
    on = {i: builds[i].worker for i in (a, b)}
    log = BuildAction.LOG_APPEND

    reports = [(log, {"number": 1, "lines": ["checked"]})]

    def request(build_id: int, token: str, hostname: str) -> dict:
        proof = make_proof(system.identity(hostname), token=token, reports=reports,
                           build_id=build_id, now=datetime.now(UTC))
        return {"build_id": build_id, "token": token, "proof": proof,
                "reports_digest": reports_hash(reports)}

    good_a = request(a, system.tokens[a], on[a])
    header, claims, sig = system.tokens[b].split(".")
    forged = ".".join([header, claims, base64.urlsafe_b64encode(b"x" * 64).decode()])
    answers = await system.authority.verify_many([
        good_a,
        request(b, system.tokens[a], on[a]),       # a's token on build b
        request(b, system.tokens[b], on[a]),       # b's token, proof by a's worker
        request(b, forged, on[b]),                 # b's token, signature not the server's
        good_a,                                    # the same proof again: a replay
        {"build_id": b, "token": system.tokens[b]},   # no proof, no reports
        "not a request",
        request(b, system.tokens[b], on[b]),
    ])
    assert answers[0].wkr == on[a] and answers[-1].wkr == on[b]
    refused = answers[1:-1]
    assert all(isinstance(r, Rejected) for r in refused), refused
    assert [r.reason for r in refused[-2:]] == [Reason.MALFORMED, Reason.MALFORMED]
    with pytest.raises(Rejected) as e:  # no more than one call may carry
        await system.authority.verify_many([good_a] * (MAX_REQUESTS + 1))
    assert e.value.reason is Reason.MALFORMED
    for build_id in (a, b):
        await system.scheduler.cancel(build_id)


async def test_several_builds_reports_in_one_call_are_answered_each_on_its_own(system):
    """reports_many (a worker's builds' reports coalesced into one call): a forged,
    swapped or malformed call is refused alone; the good ones are written."""
    await system.add_worker("w1", build_limit=2)
    a = await system.submit(pipeline("sleep 30"))
    b = await system.submit(pipeline("sleep 30"))
    await system.pump([a, b], until=lambda x: all(x[i].started_at is not None for i in (a, b)))
    me = system.identity("w1")

    def call(build_id: int, token: str, text: str) -> dict:
        proof, reports = signed(me, token=token, build_id=build_id, reports=[
            (BuildAction.LOG_APPEND, {"number": 1, "seq": 90, "lines": [text]})])
        return {"build_id": build_id, "token": token, "proof": proof, "reports": reports}

    header, claims, _ = system.tokens[b].split(".")
    forged = ".".join([header, claims, base64.urlsafe_b64encode(b"x" * 64).decode()])
    answers = await system.scheduler.reports_many([
        call(a, system.tokens[a], "a-good"),
        call(b, system.tokens[a], "b-with-as-token"),
        call(b, forged, "b-forged"),
        {**call(b, system.tokens[b], "b-extra"), "extra": 1},
        "not a call",
        call(b, system.tokens[b], "b-good"),
    ])
    assert answers[0] is None and answers[-1] is None
    assert all(isinstance(r, Rejected) for r in answers[1:-1]), answers
    assert [r.reason for r in answers[3:5]] == [Reason.MALFORMED, Reason.MALFORMED]
    assert "a-good" in await logs_of(system, a)
    assert "b-good" in await logs_of(system, b)
    assert "b-with" not in await logs_of(system, b) and "b-forged" not in await logs_of(system, b)
    with pytest.raises(Rejected):
        await system.scheduler.reports_many([call(a, system.tokens[a], "x")] * (MAX_REQUESTS + 1))
    for build_id in (a, b):
        await system.scheduler.cancel(build_id)


async def test_builds_placed_together_on_one_worker_share_its_calls(system):
    """A pass placing several builds on one worker's slots sends their challenges and
    packages in one call each; each build still gets its own challenge, token and
    package, and every build runs once."""
    await system.add_worker("w1", build_limit=4)
    ids = [await system.submit(pipeline("sleep 1")) for _ in range(4)]
    await system.pump(ids, until=lambda x: all(b.started_at is not None for b in x.values()))
    calls = system.scheduler.status()["calls"]["workers"]["w1"]
    assert calls["execute_packages"]["requests"] == calls["availability_many"]["requests"] == 4
    assert calls["execute_packages"]["calls"] < 4 and calls["availability_many"]["calls"] < 4
    counts = system.scheduler.status()["calls"]
    assert counts["authority"]["issue_packages"]["requests"] == 4
    shared = counts["database"]["write_shared"]
    assert shared["requests"] >= 4 + 4 + 4  # the builds, their dispatch, their start
    assert shared["calls"] <= shared["requests"]
    assert len({system.tokens[i] for i in ids}) == 4
    builds = await system.pump(ids)
    assert all(b.status == "success" and b.attempts == 1 for b in builds.values())


async def test_a_batch_of_packages_answers_each_on_its_own(system):
    await system.add_worker("w1")
    build_id = await system.submit(pipeline("true"))
    issued, unknown, malformed = await system.authority.issue_packages(
        [(build_id, "w1"), (build_id + 1000, "w1"), ("1", "w1")])
    assert issued.build_id == build_id and issued.worker == "w1"
    assert isinstance(unknown, NotFound)
    assert isinstance(malformed, Rejected) and malformed.reason is Reason.MALFORMED


async def test_a_batch_of_packages_reads_its_rows_in_one_query(system, monkeypatch):
    await system.add_worker("w1")
    await system.add_worker("w2")
    a, b = [await system.submit(pipeline("true")) for _ in range(2)]
    read_one = system.store.package_rows
    singles = []

    async def counted(build_id, hostname):
        singles.append(build_id)
        return await read_one(build_id, hostname)

    monkeypatch.setattr(system.store, "package_rows", counted)
    first, second, unknown = await system.authority.issue_packages(
        [(a, "w1"), (b, "w2"), (b, "nobody")])
    assert (first.build_id, first.worker, second.build_id, second.worker) == (a, "w1", b, "w2")
    assert isinstance(unknown, NotFound)
    assert singles == [b]  # only the pair the batch read did not find, read on its own


async def test_metrics_follow_the_builds(system):
    await system.add_worker("w1", build_limit=2)
    ok = await system.submit(pipeline("true"))
    bad = await system.submit(pipeline("exit 1"))
    await system.pump([ok, bad])
    await system.scheduler.check_workers()
    m = system.metrics
    assert m.finished == {"success": 1, "failure": 1}
    assert len(m.latencies) == 2 and all(0 <= x < 60 for x in m.latencies)
    assert m.gauges["free_slots"] == {"vela": 2}
    assert m.gauges["workers"] == {"idle": 1}
    assert m.gauges["running_builds"] == {"": 0}
    # The coalesced calls, counted as the status gives them: two packages issued, and
    # never fewer requests than calls.
    assert m.requests["authority", "issue_packages"] == 2
    assert 1 <= m.calls["workers", "execute_packages"] <= m.requests["workers", "execute_packages"]
    assert m.requests["workers", "execute_packages"] == 2
    await system.scheduler.check_workers()  # nothing new: nothing counted twice
    assert m.requests["authority", "issue_packages"] == 2
    with pytest.raises(Rejected):
        await report_one(system.scheduler, build_id=ok, action=BuildAction.FINISH,
                         payload={"status": "success"}, token="x.y.z", proof="")
    assert sum(m.rejections.values()) == 1


async def test_queue_that_lost_its_contents_is_refilled(system):
    build_id = await system.submit(pipeline("echo again"))
    if not hasattr(system.queue, "prefix"):
        # The database queue is durable: it has no epoch and never needs refilling.
        assert await system.queue.epoch() is None
        assert await system.scheduler.resync_queue() == 0
        return
    # A new Scheduler cannot know what Redis lost before it started: it re-pushes
    # every pending build once (the duplicate is acked as not pending later).
    assert await system.scheduler.resync_queue() == 1
    assert await system.scheduler.resync_queue() == 0
    # Redis restarted without persistence: our keys are gone and its run id changed.
    real = await system.queue.epoch()
    keys = [k async for k in system.queue._r.scan_iter(match=f"{system.queue.prefix}:*")]
    await system.queue._r.delete(*keys)

    async def restarted() -> str:
        return real + "-restarted"

    system.queue.epoch = restarted
    assert await system.scheduler.resync_queue() == 1
    assert await system.scheduler.resync_queue() == 0  # once per restart
    await system.add_worker("w1")
    assert (await system.pump([build_id]))[build_id].status == "success"


async def test_queue_outage_never_fails_or_loses_a_stored_build(system, monkeypatch):
    """Create and requeue during a queue outage: the build waits pending, unqueued,
    and the watch loop's resync pushes it once the queue answers again. (A queue in
    the build's own database queues a new build in the build's transaction: only the
    requeue has a push of its own to fail.)"""
    from redis.exceptions import ConnectionError as RedisConnectionError

    same_db = system.queue.pusher_within(system.store.engine) is not None

    async def down(route, payload):
        raise RedisConnectionError("queue restarting")

    await system.scheduler.resync_queue()  # baseline epoch
    early = await system.submit(pipeline("echo queued first"))
    assert (await system.store.get_build(early)).enqueued_at is not None
    real_push = system.queue._push
    monkeypatch.setattr(system.queue, "_push", down)
    build_id = await system.submit(pipeline("echo queued late"))
    build = await system.store.get_build(build_id)
    assert build.status == "pending" and (build.enqueued_at is not None) is same_db
    # A requeue (of a build pushed before) that fails marks the build unqueued too.
    assert await system.scheduler.builds.enqueue(await system.store.get_build(early)) is False
    assert (await system.store.get_build(early)).enqueued_at is None
    assert await system.scheduler.resync_queue() == 0  # still down: nothing pushed

    monkeypatch.setattr(system.queue, "_push", real_push)
    assert await system.scheduler.resync_queue() == (1 if same_db else 2)
    assert await system.scheduler.resync_queue() == 0  # pushed once
    for b in (early, build_id):
        assert (await system.store.get_build(b)).enqueued_at is not None
    await system.add_worker("w1")
    builds = await system.pump([early, build_id])
    assert {b.status for b in builds.values()} == {"success"}


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # the database queue
async def test_a_queue_in_the_builds_database_queues_it_in_the_same_transaction(
        system, monkeypatch):
    """Embedded default: the build and its queue item commit together or not at all."""
    assert system.queue.pusher_within(system.store.engine) is not None
    kept = await system.submit(pipeline("true"))
    assert (await system.store.get_build(kept)).enqueued_at is not None
    assert (await system.queue.depth())["vela"].ready == 1

    def broken(item):
        raise RuntimeError("signing failed")

    monkeypatch.setattr(system.scheduler.builds.signer, "sign", broken)
    with pytest.raises(RuntimeError):
        await system.submit(pipeline("true"))
    assert [b.id for b in await system.store.list_builds()] == [kept]
    assert (await system.queue.depth())["vela"].ready == 1


async def test_capacity_long_poll_wakes_on_a_freed_slot_and_on_new_work(system):
    sched = system.scheduler
    assert (await sched.capacity(wait_s=0.05)).free == {}  # no worker: times out empty
    core = await system.add_worker("w1")
    cap = await sched.capacity()
    assert cap.free == {"vela": 1} and cap.total == 1
    # A free slot but no work since the listener last looked: waits for a build.
    waiting = asyncio.create_task(sched.capacity(wait_s=30, seen_work=cap.work))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    build_id = await system.submit(pipeline("sleep 2"))
    woke = await asyncio.wait_for(waiting, 10)
    assert woke.work != cap.work and woke.free == {"vela": 1}
    # Every slot taken: the long poll returns once the build ends and frees it.
    await system.pump([build_id], until=lambda b: b[build_id].status == "running")
    assert (await sched.capacity()).free == {}
    freed = asyncio.create_task(sched.capacity(wait_s=30))
    await system.pump([build_id])
    await core.wait_idle(10)
    assert (await asyncio.wait_for(freed, 10)).free == {"vela": 1}


async def test_worker_rows_follow_the_registry_once_per_watch_pass(system):
    """Dispatches and finishes mark the worker's row; the watch pass writes it."""
    await system.add_worker("w1")
    await system.scheduler.check_workers()
    build_id = await system.submit(pipeline("sleep 1"))
    await system.pump([build_id], until=lambda b: b[build_id].status == "running")
    await system.scheduler.check_workers()
    row = await system.store.get_worker("w1")
    assert row.running_builds == [build_id] and row.last_build_started is not None
    await system.pump([build_id])
    # The finish is committed before the Scheduler frees the slot (after the write
    # returns): the row follows the registry at the first watch pass after that.
    for _ in range(200):
        entry = system.scheduler.registry.get("w1")
        if entry is not None and not entry.running:
            break
        await asyncio.sleep(0.05)  # poll with a deadline
    await system.scheduler.check_workers()
    row = await system.store.get_worker("w1")
    assert row.running_builds == [] and row.last_build_finished is not None


async def test_a_log_chunk_retried_after_a_lost_reply_is_stored_once(system, monkeypatch):
    """The Scheduler wrote the chunk but its reply never reached the worker (the
    actor died, the DB connection dropped after commit): the retry is a no-op."""
    real = system.scheduler.reports
    lost = []

    async def reply_lost_once(**kw):
        await real(**kw)
        logs = [r["payload"] for r in kw["reports"] if r["action"] == BuildAction.LOG_APPEND]
        if logs and not lost:
            lost.append(logs[0])
            raise TimeoutError("reply lost")

    monkeypatch.setattr(system.scheduler, "reports", reply_lost_once)
    await system.add_worker("w1")
    build_id = await system.submit(pipeline("echo exactly-once"))
    assert (await system.pump([build_id]))[build_id].status == "success"
    assert lost and lost[0]["seq"] == 1
    assert (await logs_of(system, build_id)).count("exactly-once") == 1


async def test_a_new_scheduler_refills_a_volatile_queue_it_could_not_watch(system):
    """Redis restarted empty while the Scheduler was down too (nobody saw its run id
    change): the new Scheduler re-pushes every pending build. A durable queue gets
    no duplicates."""
    build_id = await system.submit(pipeline("echo still here"))
    await system.scheduler.resync_queue()
    volatile = hasattr(system.queue, "prefix")
    if volatile:
        keys = [k async for k in system.queue._r.scan_iter(match=f"{system.queue.prefix}:*")]
        await system.queue._r.delete(*keys)
        assert await system.queue.depth() == {}
    await system.restart_scheduler()
    assert (await system.queue.depth())["vela"].ready == 1
    await system.add_worker("w1")
    assert (await system.pump([build_id]))[build_id].status == "success"


async def test_a_worker_of_an_older_vela_is_refused_at_registration(system):
    """A worker from before the one-proof-per-call protocol (its registration names no
    protocol) could not report on a single build here: it is refused when it registers,
    with what to do, before its registration token is spent (the upgraded worker can
    use it), and never placed."""
    token = await system.authority.registration_token(routes=["vela"], hostname="old")
    identity = system.identity("old")
    wire = Registration(hostname="old", routes=["vela"], build_limit=1,
                        sign_public_key=identity.sign_public_key,
                        seal_public_key=identity.seal_public_key,
                        actor_name="vela-worker-old").model_dump(mode="json")
    del wire["protocol"]
    with pytest.raises(Rejected) as e:
        await system.scheduler.register(wire, token=token)
    assert e.value.reason is Reason.WORKER_PROTOCOL_MISMATCH
    assert "install the same vela version" in str(e.value)
    row = await system.store.get_registration_token(hash_registration_token(token))
    assert row is not None and row.used_at is None
    assert await system.store.find_worker("old") is None
    assert Registration.from_wire({**wire, "protocol": WORKER_PROTOCOL}).hostname == "old"
