"""The same builds in either queue mode, and a fleet mid-migration with one route in
each mode (no Ray): the legacy gateway, LegacyWorkers, the server's listener and
Scheduler, all on one queue and one database."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.conftest import pipeline
from vela.domain import BuildStatus

ROOT = Path(__file__).resolve().parents[2]
HELLO = (ROOT / "examples" / "hello.yml").read_text()
FAILING = (ROOT / "examples" / "failing.yml").read_text()
GREETING = "Gr33ting-for-both-modes"


async def logs_of(fleet, build_id: int) -> str:
    return "".join(text for _, _, text in await fleet.store.get_logs(build_id))


async def steps_of(fleet, build_id: int) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in await fleet.store.get_steps(build_id)]


async def test_examples_run_alike_in_either_mode(fleet):
    hello = await fleet.submit(HELLO, repo="demo/hello", secrets={"greeting_token": GREETING})
    failing = await fleet.submit(FAILING, repo="demo/hello")
    builds = await fleet.pump([hello, failing])
    assert builds[hello].status == "success", (builds[hello].reason, builds[hello].message)
    assert builds[failing].status == "failure"
    assert all(b.worker == "w1" and b.started_at and b.finished_at for b in builds.values())
    assert await steps_of(fleet, hello) == [("greet", "success"), ("write", "success"),
                                            ("read", "success")]
    assert await steps_of(fleet, failing) == [("lint", "failure"), ("test", "failure"),
                                              ("deploy", "skipped")]
    text = await logs_of(fleet, hello)
    assert "the greeting token is ***" in text and "hello, world" in text
    assert "token visible here? no" in text and GREETING not in text
    assert "hello from step greet of build 1 (demo/hello)" in text


async def test_mixed_fleet_runs_each_route_in_its_mode(mixed):
    await mixed.add_worker("queueless", routes=("vela",))
    legacy = mixed.add_legacy_worker("legacy", routes=("gpu",))
    ids = {route: [await mixed.submit(pipeline("echo on $VELA_ROUTE", "sleep 0.2"),
                                      route=route) for _ in range(3)]
           for route in ("vela", "gpu")}
    seen_jti: dict[int, str | None] = {}

    def watch(builds):
        for b in builds.values():
            if b.status == "running":
                seen_jti[b.id] = b.token_jti
        return all(BuildStatus(b.status).terminal for b in builds.values())

    builds = await mixed.pump(ids["vela"] + ids["gpu"], until=watch)
    for route, expected in (("vela", "queueless"), ("gpu", "legacy")):
        for build_id in ids[route]:
            b = builds[build_id]
            assert (b.status, b.worker) == ("success", expected), (b.reason, b.message)
            assert f"on {route}" in await logs_of(mixed, build_id)
    # Server mode: a build token per dispatch, recorded on the row; legacy: none.
    assert all(seen_jti.get(b) for b in ids["vela"] if b in seen_jti)
    assert all(seen_jti.get(b) is None for b in ids["gpu"])
    assert mixed.authority.stats.issued == 3 and mixed.scheduler.stats.dispatched == 3
    assert mixed.gateway.stats.claimed == 3
    assert legacy.status()["connected"] and legacy.running == []
    # The server's listener never popped a legacy route, nor the legacy worker a server one.
    assert mixed.listener.verifier.known_routes == ("vela",)
    assert mixed.listener.stats.dead_lettered == {}


async def test_legacy_build_survives_a_scheduler_restart(mixed):
    mixed.add_legacy_worker("legacy")
    build_id = await mixed.submit(pipeline("sleep 1", "echo after"), route="gpu")
    await mixed.pump([build_id], until=lambda b: b[build_id].started_at is not None)
    # A restarted Scheduler ends running builds of workers it does not know, but a
    # legacy worker's build is not its to end.
    await mixed.restart_scheduler()
    assert (await mixed.store.get_build(build_id)).status == "running"
    final = (await mixed.pump([build_id]))[build_id]
    assert (final.status, final.worker) == ("success", "legacy")


@pytest.mark.parametrize("route", ["vela", "gpu"])
async def test_cancel_reaches_either_kind_of_worker(mixed, route):
    await mixed.add_worker("queueless", routes=("vela",))
    mixed.add_legacy_worker("legacy", routes=("gpu",))
    build_id = await mixed.submit(pipeline("while true; do echo tick; sleep 0.1; done"),
                                  route=route)
    await mixed.pump([build_id], until=lambda b: b[build_id].started_at is not None)
    assert await mixed.scheduler.cancel(build_id) is BuildStatus.CANCELED
    worker = (mixed.legacy["legacy"] if route == "gpu"
              else mixed.directory.clients["queueless"].core)
    # The legacy worker learns it from its next report being refused (classic Vela).
    await worker.wait_idle(15)
    assert (await mixed.store.get_build(build_id)).status == "canceled"


async def test_legacy_worker_stops_popping_when_the_gateway_is_away(mixed, monkeypatch):
    from vela.legacy.worker import Poll

    worker = mixed.add_legacy_worker("legacy")
    await worker.connect()
    build_id = await mixed.submit(pipeline("true"), route="gpu")

    async def away(**_):
        raise TimeoutError("the legacy gateway is not running")

    monkeypatch.setattr(mixed.gateway, "claim", away)
    assert await worker.poll_once() is Poll.RELEASED
    # The item is back in the queue, and the worker pops nothing until a hello succeeds.
    assert not worker.connected
    assert (await mixed.queue.depth())["gpu"].ready == 1
    monkeypatch.undo()
    final = (await mixed.pump([build_id]))[build_id]
    assert (final.status, final.worker) == ("success", "legacy")


@pytest.mark.parametrize("route", ["vela", "gpu"])
async def test_a_build_past_its_deadline_is_ended_in_either_mode(mixed, route):
    """A worker that never ends its build (hung, or its end report lost after the build
    token expired): once the build's timeout plus the token grace have passed, the
    Scheduler ends it error/deadline_exceeded and the worker stops it; nothing stays
    running for ever."""
    from datetime import UTC, datetime, timedelta

    from vela.server.scheduler import DEADLINE_EXCEEDED

    await mixed.add_worker("queueless", routes=("vela",))
    mixed.add_legacy_worker("legacy", routes=("gpu",))
    endless = await mixed.submit(pipeline("while true; do echo tick; sleep 0.1; done"),
                                 route=route, timeout_s=60)
    await mixed.pump([endless], until=lambda b: b[endless].started_at is not None)
    assert await mixed.scheduler.end_overdue(force=True) == 0  # not yet
    later = 60 + mixed.settings.tokens.build_token_grace_s + 5
    mixed.scheduler._now = lambda: datetime.now(UTC) + timedelta(seconds=later)
    assert await mixed.scheduler.end_overdue(force=True) == 1
    build = await mixed.store.get_build(endless)
    assert (build.status, build.reason) == ("error", DEADLINE_EXCEEDED)
    assert "60 s" in build.message
    worker = (mixed.legacy["legacy"] if route == "gpu"
              else mixed.directory.clients["queueless"].core)
    await worker.wait_idle(15)  # told to stop (queueless), or refused its next report
    assert (await mixed.store.get_build(endless)).status == "error"  # nothing overwrote it
    assert await mixed.scheduler.end_overdue(force=True) == 0
