"""Cancel and restart around a dispatch: a build canceled while it is being placed never
starts, a cancel that loses to the build's own end says so, a restart checks its route."""

from __future__ import annotations

import pytest

from tests.server.conftest import pipeline
from vela.api import ServerBackend
from vela.api.backend import dispatch
from vela.api.errors import ApiError
from vela.domain import BuildStatus
from vela.errors import VelaError


async def test_a_build_canceled_during_its_dispatch_write_is_never_sent(system, monkeypatch):
    """The cancel lands while the dispatch records the build running: its package is not
    sent at all (it used to go out after the cancel, and its first step started)."""
    core = await system.add_worker("w1")
    client = system.directory.clients["w1"]
    sent: list[int] = []
    execute = client._execute_package

    async def counted(package):
        sent.append(package["build_id"])
        return await execute(package)

    client._execute_package = counted
    build_id = await system.submit(pipeline("echo should-not-run"))
    real = system.store.transition_build
    canceled: list[BuildStatus] = []

    async def cancel_meanwhile(bid, expected, new, **kw):
        out = await real(bid, expected, new, **kw)
        if (expected, new) == (BuildStatus.PENDING, BuildStatus.RUNNING):
            canceled.append(await system.scheduler.cancel(bid))
        return out

    monkeypatch.setattr(system.store, "transition_build", cancel_meanwhile)
    builds = await system.pump([build_id])
    assert canceled == [BuildStatus.CANCELED] and sent == []
    assert builds[build_id].status == BuildStatus.CANCELED.value
    assert core.running == [] and system.scheduler.registry.get("w1").running == set()


async def test_a_stop_that_overtakes_its_package_keeps_the_build_from_starting(system,
                                                                            tmp_path):
    """The package waits to be sent (a batch is in flight) while the cancel reaches the
    worker first: the worker remembers it and refuses the package when it comes."""
    marker = tmp_path / "deployed"
    core = await system.add_worker("w1")
    client = system.directory.clients["w1"]
    execute = client._execute_package
    answered: list[BuildStatus] = []
    receipts: list[dict] = []

    async def cancel_first(package):
        answered.append(await system.scheduler.cancel(package["build_id"]))
        receipts.append(await execute(package))
        return receipts[-1]

    client._execute_package = cancel_first
    build_id = await system.submit(pipeline(f"touch {marker}"))
    builds = await system.pump([build_id])
    assert answered == [BuildStatus.CANCELED]
    assert builds[build_id].status == BuildStatus.CANCELED.value
    assert receipts[0]["accepted"] is False and receipts[0]["reason"] == "stopped_before_it_came"
    await core.wait_idle(10)
    assert not marker.exists()


async def test_a_cancel_that_loses_to_the_builds_end_is_a_conflict(system, monkeypatch):
    await system.add_worker("w1")
    build_id = await system.submit(pipeline("sleep 30"))
    await system.pump([build_id], until=lambda b: b[build_id].started_at is not None)
    backend = ServerBackend(scheduler=system.scheduler, issuer=system.authority,
                            settings=system.settings)
    real = system.store.transition_build

    async def finish_first(bid, expected, new, **kw):
        if (expected, new) == (BuildStatus.RUNNING, BuildStatus.CANCELED):
            await real(bid, BuildStatus.RUNNING, BuildStatus.SUCCESS)  # its end lands first
        return await real(bid, expected, new, **kw)

    monkeypatch.setattr(system.store, "transition_build", finish_first)
    with pytest.raises(ApiError) as e:
        await dispatch(backend, "cancel_build", {"ref": {"id": build_id}})
    assert e.value.status == 409 and "ended already (success)" in e.value.message
    await system.directory.clients["w1"].core.close()


async def test_a_restart_checks_its_route_as_a_create_does(system):
    old = await system.submit(pipeline("true"), route="gpu")
    await system.scheduler.cancel(old)
    system.scheduler.builds.routes = ("vela",)  # the server restarted without `gpu`
    with pytest.raises(VelaError, match="no longer queues on"):
        await system.scheduler.builds.restart(old)
    assert [b.id for b in await system.store.list_builds()] == [old]


async def test_a_build_whose_stored_pipeline_cannot_run_ends_and_others_go_on(system):
    """A stored executable that no longer parses (an older vela's) was released for ever,
    taking the builds of its batch down with it (its error did not cross back whole)."""
    await system.add_worker("w1", build_limit=2)
    bad = await system.submit(pipeline("true"))
    good = await system.submit(pipeline("true"))
    await system.store.set_build_fields(bad, executable='{"version": "0"}')
    builds = await system.pump([bad, good])
    assert (builds[good].status, builds[bad].status, builds[bad].reason) == (
        "success", "error", "invalid_executable")
    assert "cannot run" in builds[bad].message
