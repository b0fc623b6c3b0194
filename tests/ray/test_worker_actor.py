"""The WorkerActor on real Ray, against a test double of the server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.ray.conftest import wait_until
from tests.server.conftest import pipeline
from vela.security import Registration
from vela.security.onboarding import WORKER_PROTOCOL

pytestmark = pytest.mark.ray

SECRET = "double-s3cr3t"


def _fake_server_class():
    import ray

    from vela.coalesce import answer_each
    from vela.pipeline import compile_pipeline
    from vela.security import (
        KeyRing,
        Rejected,
        ReplayCache,
        jwk_thumbprint,
        mint_build_token,
        publish_key_set,
        reports_hash,
        seal_package,
        verify_proof,
    )
    from vela.security.tokens import verify_build_token

    @ray.remote
    class FakeServer:
        """Plays the Scheduler: takes any registration, records checked reports."""

        def __init__(self, refuse: str | None = None) -> None:
            self.refuse = refuse  # a reason code: refuse every registration with it
            self.ring = KeyRing.generate(datetime.now(UTC))
            self.replay = ReplayCache(max_age_s=30, started_at=datetime.now(UTC))
            self.registration: dict[str, Any] | None = None
            self.got: list[tuple[int, str, dict[str, Any]]] = []
            self.bad_proofs = 0

        def _now(self) -> datetime:
            return datetime.now(UTC)

        async def register(self, registration, *, token, running=None):
            if self.refuse:
                raise Rejected(self.refuse)
            self.registration = registration
            return publish_key_set(self.ring, server_id="test-server",
                                   now=self._now()).model_dump(mode="json")

        async def checkin(self, hostname):
            return self.registration is not None

        async def worker_left(self, hostname):
            return None

        async def reports(self, *, build_id, token, proof, reports):  # the Scheduler's
            now = self._now()
            claims = verify_build_token(token, keys=self.ring.verifying_keys(now),
                                        issuer="test-server", now=now)
            try:  # one proof per call, over all its reports
                verify_proof(proof, token=token, claims=claims,
                             worker_sign_key=self.registration["sign_public_key"],
                             reports_digest=reports_hash(
                                 [(r["action"], r["payload"]) for r in reports]),
                             build_id=build_id, cache=self.replay, now=now)
            except Exception:
                self.bad_proofs += 1
                raise
            self.got += [(build_id, r["action"], r["payload"]) for r in reports]

        async def reports_many(self, calls):  # how the worker sends them (coalesced)
            return await answer_each(calls, lambda call: self.reports(**call))

        async def package(self, build_id, text, *, worker=None, secrets=None, tamper=False):
            reg = self.registration
            now = self._now()
            token, _ = mint_build_token(self.ring, issuer="test-server", build_id=build_id,
                                        worker=worker or reg["hostname"],
                                        jkt=jwk_thumbprint(reg["sign_public_key"]),
                                        timeout_s=60, grace_s=10, now=now)
            executable = compile_pipeline(text).to_json()
            pkg = seal_package(ring=self.ring, server_id="test-server", build_id=build_id,
                               worker=worker or reg["hostname"],
                               worker_seal_key=reg["seal_public_key"],
                               build={"build_id": build_id, "timeout_s": 60},
                               executable=executable, secrets=secrets or {},
                               build_token=token, now=now, ttl_s=60).to_wire()
            if tamper:
                pkg["executable"] = pkg["executable"].replace("echo", "true")
            return pkg

        async def state(self):
            return {"reports": self.got, "bad_proofs": self.bad_proofs,
                    "registration": self.registration}

    return FakeServer


@pytest.fixture
def double(settings):
    yield from _double(settings)


@pytest.fixture
def double_with_backlog(settings):
    settings.worker.backlog = 1
    yield from _double(settings)


def _double(settings):
    import ray

    from actors._ray import SCHEDULER
    from actors.deploy import start_worker, stop_all

    fake = _fake_server_class().options(name=SCHEDULER, namespace=settings.ray.namespace,
                                        num_cpus=0).remote()
    handle, status = start_worker(settings, hostname="wa", routes=["vela"], build_limit=2,
                                  state_dir=settings.server.data_dir / "wa",
                                  registration_token="vrt_" + "x" * 43, max_restarts=0)
    assert status["registered"], status
    try:
        yield fake, handle
    finally:
        stop_all(settings.ray.namespace)
        ray.kill(fake)


def test_a_refused_registration_answers_at_once_with_what_to_do(settings):
    """A refusal is not transient (a used token, another vela version): the worker's
    start returns with the server's reason and what to do, instead of waiting out its
    registration timeout; the worker keeps retrying slowly in case an admin fixes it."""
    import ray

    from actors._ray import SCHEDULER, worker_actor_name
    from actors.deploy import stop_all
    from actors.worker import WorkerActor

    ns = settings.ray.namespace
    fake = _fake_server_class().options(name=SCHEDULER, namespace=ns, num_cpus=0).remote(
        refuse="worker_protocol_mismatch")
    try:
        handle = WorkerActor.options(name=worker_actor_name("wr"), namespace=ns,
                                     max_restarts=0).remote(
            settings, hostname="wr", routes=["vela"], build_limit=1,
            state_dir=str(settings.server.data_dir / "wr"),
            registration_token="vrt_" + "x" * 43)
        # Asked to wait up to 10 minutes, it answers well within the minute allowed here.
        status = ray.get(handle.wait_registered.remote(600), timeout=60)
        assert status["registered"] is False
        assert "worker_protocol_mismatch" in status["error"]
        assert "install the same vela version" in status["error"]
    finally:
        stop_all(ns)
        ray.kill(fake)


def _finished(fake, build_id):
    import ray

    st = ray.get(fake.state.remote())
    return [p for b, a, p in st["reports"] if b == build_id and a == "build.finish"]


def test_accepts_a_valid_package_and_reports_with_proofs(double):
    import ray

    fake, worker = double
    # The registration names the worker protocol this server speaks.
    registration = ray.get(fake.state.remote())["registration"]
    assert registration["protocol"] == WORKER_PROTOCOL
    assert Registration.from_wire(registration).hostname == registration["hostname"]
    pkg = ray.get(fake.package.remote(1, pipeline('echo "s=$API_TOKEN"', secrets=("api_token",)),
                                      secrets={"api_token": SECRET}))
    receipt = ray.get(worker.execute_package.remote(pkg))
    assert receipt["accepted"] is True, receipt
    # The start comes back with the receipt, for the server to check like any report call.
    start = receipt["start"]
    assert set(start) == {"reports", "proof"} and start["proof"]
    assert [r["action"] for r in start["reports"]] == ["build.start"]
    ray.get(fake.reports.remote(build_id=1, token=pkg["build_token"], **start))
    (finish,) = wait_until(lambda: _finished(fake, 1), 60, "the finish report")
    assert finish["status"] == "success"
    st = ray.get(fake.state.remote())
    actions = [a for b, a, _ in st["reports"] if b == 1]
    # The worker did not report its start again: only the one checked above.
    assert actions.count("build.start") == 1 and actions[-1] == "build.finish"
    lines = [line for b, a, p in st["reports"] if a == "log.append" for line in p["lines"]]
    assert "s=***" in lines and not any(SECRET in x for x in lines)
    assert st["bad_proofs"] == 0
    # The same package again is a replay.
    again = ray.get(worker.execute_package.remote(pkg))
    assert again["accepted"] is False and again["reason"] in ("duplicate_package",
                                                               "package_expired")


def test_batch_calls_answer_each_package_and_challenge_on_its_own(double):
    """execute_packages / availability_many (what the Scheduler's coalesced calls use):
    a tampered or malformed entry is refused alone; the good package runs."""
    import ray

    from vela.security import Reason, Rejected

    fake, worker = double
    good = ray.get(fake.package.remote(31, pipeline("echo batched")))
    tampered = ray.get(fake.package.remote(32, pipeline("echo hi"), tamper=True))
    ok, bad, junk = ray.get(worker.execute_packages.remote([good, tampered, "junk"]))
    assert ok["accepted"] is True
    assert [r["action"] for r in ok["start"]["reports"]] == ["build.start"]
    assert (bad["accepted"], bad["reason"]) == (False, "package_tampered")
    assert (junk["accepted"], junk["reason"]) == (False, "malformed")
    (finish,) = wait_until(lambda: _finished(fake, 31), 60, "the finish report")
    assert finish["status"] == "success"
    (malformed,) = ray.get(worker.availability_many.remote([{"not": "a challenge"}]))
    assert isinstance(malformed, Rejected) and malformed.reason is Reason.MALFORMED
    with pytest.raises(Rejected):  # more than one call may carry: refused whole
        ray.get(worker.execute_packages.remote([good] * 65))


@pytest.mark.parametrize(("kind", "reason"), [("tamper", "package_tampered"),
                                              ("elsewhere", "package_not_for_me")])
def test_refuses_tampered_and_misaddressed_packages(double, kind, reason):
    import ray

    fake, worker = double
    pkg = ray.get(fake.package.remote(7, pipeline("echo hi"), tamper=kind == "tamper",
                                      worker="someone-else" if kind == "elsewhere" else None))
    receipt = ray.get(worker.execute_package.remote(pkg))
    assert receipt == {**receipt, "accepted": False, "reason": reason}
    assert ray.get(worker.status.remote())["running"] == []


def test_build_limit_and_drain(double):
    import ray
    from ray.exceptions import RayActorError

    fake, worker = double
    pkgs = [ray.get(fake.package.remote(10 + i, pipeline("sleep 1"))) for i in range(3)]
    receipts = ray.get([worker.execute_package.remote(p) for p in pkgs])
    assert sum(r["accepted"] for r in receipts) == 2
    assert [r["reason"] for r in receipts if not r["accepted"]] == ["no_free_slot"]
    # A running build's start, signed afresh (for a server whose copy went stale).
    first = next(r for r in receipts if r["accepted"])
    fresh = ray.get(worker.start_report.remote(first["build_id"]))
    assert set(fresh) == {"reports", "proof"} and fresh["proof"] != first["start"]["proof"]
    assert [r["action"] for r in fresh["reports"]] == ["build.start"]
    assert fresh["reports"] == first["start"]["reports"]
    assert ray.get(worker.start_report.remote(999)) is None
    drained = worker.drain.remote(60)
    late = ray.get(worker.execute_package.remote(
        ray.get(fake.package.remote(20, pipeline("true")))))
    assert late["accepted"] is False and late["reason"] == "draining"
    try:
        ray.get(drained, timeout=60)
    except RayActorError:
        pass  # the actor exits as the call returns

    def dead() -> bool:
        try:
            ray.get(worker.status.remote(), timeout=10)
        except RayActorError:
            return True
        return False

    wait_until(dead, 30, "the drained worker to exit")
    for r in receipts:
        if r["accepted"]:
            assert _finished(fake, r["build_id"])[0]["status"] == "success"


def test_a_backlog_is_registered_and_its_packages_start_as_slots_free(double_with_backlog):
    import ray

    fake, worker = double_with_backlog
    assert ray.get(fake.state.remote())["registration"]["backlog"] == 1
    pkgs = [ray.get(fake.package.remote(30 + i, pipeline("sleep 2"))) for i in range(4)]
    receipts = ray.get([worker.execute_package.remote(p) for p in pkgs])
    accepted = [r for r in receipts if r["accepted"]]  # two slots and one held
    assert len(accepted) == 3
    assert [r["reason"] for r in receipts if not r["accepted"]] == ["no_free_slot"]
    held = [r["build_id"] for r in accepted if r["start"] is None]
    assert len(held) == 1 and ray.get(worker.status.remote())["held"] == held
    wait_until(lambda: all(_finished(fake, r["build_id"]) for r in accepted), 60,
               "the three builds to finish")
    for r in accepted:
        assert _finished(fake, r["build_id"])[0]["status"] == "success"
    actions = [a for b, a, _ in ray.get(fake.state.remote())["reports"] if b == held[0]]
    assert actions[0] == "build.start"  # the held build reported its own start
