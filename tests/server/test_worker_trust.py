"""What the Scheduler takes from a worker, and what a worker gives whoever calls it:
a deactivated worker stays out, a worker signs only dispatch challenges, and one
worker's nonsense status fails its own health check only."""

from __future__ import annotations

import pytest

from tests.server.conftest import pipeline
from vela.domain import BuildStatus
from vela.security import Reason, Registration, Rejected


def registration(system, hostname: str, **fields) -> dict:
    identity = system.identity(hostname)
    return Registration(hostname=hostname, routes=["vela"], build_limit=1,
                        sign_public_key=identity.sign_public_key,
                        seal_public_key=identity.seal_public_key,
                        actor_name=f"vela-worker-{hostname}", **fields).model_dump(mode="json")


async def test_deactivated_worker_cannot_register_back_into_dispatch(system):
    """Deactivated (a suspected compromise), the worker keeps its keys; a leaked unused
    token must not bring it back to receive builds and their secrets."""
    await system.add_worker("w1")
    await system.scheduler.set_worker_active("w1", False)
    leaked = await system.authority.registration_token(routes=["vela"], hostname=None)
    with pytest.raises(Rejected) as e:
        await system.scheduler.register(registration(system, "w1"), token=leaked)
    assert e.value.reason is Reason.WORKER_DISABLED
    assert system.scheduler.registry.get("w1").active is False
    build_id = await system.submit(pipeline("true"))
    await system.listener.run_until_idle(max_passes=5)
    assert (await system.store.get_build(build_id)).status == BuildStatus.PENDING.value
    # Activated by an admin, it registers (with a fresh token) and takes the build.
    await system.scheduler.set_worker_active("w1", True)
    await system.scheduler.register(registration(system, "w1"), token=leaked)
    builds = await system.pump([build_id])
    assert builds[build_id].status == BuildStatus.SUCCESS.value
    assert builds[build_id].worker == "w1"


async def test_worker_does_not_sign_a_reregistration_challenge_for_its_caller(system):
    """Anyone who can call a worker gets its dispatch answers; were a re-registration
    challenge answered too, they could re-register it (another actor name, limit or
    routes) without its key."""
    core = await system.add_worker("w1")
    challenge = system.scheduler.reregister_challenge("w1")
    with pytest.raises(Rejected) as e:
        core.availability(challenge)
    assert e.value.reason is Reason.CHALLENGE_MISMATCH
    row = await system.store.get_worker("w1")
    assert (row.actor_name, row.build_limit) == ("vela-worker-w1", 1)


@pytest.mark.parametrize("nonsense", [["not", "a", "dict"], {"running": ["7"]},
                                      {"running": [], "given_up": "all"},
                                      {"running": [True]}, {"draining": "yes"}])
async def test_a_nonsense_status_fails_that_workers_check_only(system, nonsense):
    await system.add_worker("good")
    await system.add_worker("bad")

    async def status() -> object:
        return nonsense

    system.directory.clients["bad"].status = status
    for _ in range(5):
        await system.scheduler.check_workers()  # raised (and skipped "good") before
        await system.scheduler.check_workers()
    assert system.scheduler.registry.get("bad").healthy is False
    assert system.scheduler.registry.get("good").healthy is True
    # A new Scheduler recovers the good worker and counts the other as lost.
    await system.restart_scheduler()
    assert "good" in system.scheduler.registry
    assert "bad" not in system.scheduler.registry
    build_id = await system.submit(pipeline("true"))
    builds = await system.pump([build_id])
    assert (builds[build_id].status, builds[build_id].worker) == ("success", "good")


async def test_a_deactivated_workers_builds_go_on_across_a_scheduler_restart(system):
    """Deactivation stops new builds, not running ones — also after the Scheduler
    restarts (it used to skip the worker then, and end its builds as lost)."""
    await system.add_worker("w1")
    build_id = await system.submit(pipeline("echo started", "sleep 1"))
    await system.pump([build_id], until=lambda b: b[build_id].started_at is not None)
    await system.scheduler.set_worker_active("w1", False)
    await system.restart_scheduler()
    assert system.scheduler.registry.get("w1").active is False
    later = await system.submit(pipeline("true"))
    builds = await system.pump([build_id], timeout_s=30)
    assert (builds[build_id].status, builds[build_id].worker) == ("success", "w1")
    assert (await system.store.get_build(later)).status == BuildStatus.PENDING.value


async def test_a_restarted_scheduler_asks_its_workers_all_at_once(system):
    """Each worker that does not answer costs a call's timeout, and every call to the
    Scheduler waits for its recovery: asked one after another, a few partitioned
    workers would stall the whole control plane for minutes."""
    import asyncio

    cores = [await system.add_worker(f"w{i}") for i in range(4)]
    asked: list[str] = []
    everyone = asyncio.Event()
    for core in cores:
        async def status(core=core) -> object:
            asked.append(core.hostname)
            if len(asked) == len(cores):
                everyone.set()
            await asyncio.wait_for(everyone.wait(), 1.0)  # answers once all were asked
            return core.status()

        system.directory.clients[core.hostname].status = status
    await system.restart_scheduler()
    assert sorted(asked) == ["w0", "w1", "w2", "w3"]
    assert all(f"w{i}" in system.scheduler.registry for i in range(4))
