"""WorkerCore in plain asyncio: packages in, checked reports out (no Ray)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vela.domain import BuildStatus
from vela.executor import MASK, LocalRuntime
from vela.pipeline import compile_pipeline
from vela.security import (
    Answer,
    BuildAction,
    BuildRequestGuard,
    ChallengeBook,
    KeyRing,
    Reason,
    Rejected,
    ReplayCache,
    WorkerIdentity,
    mint_build_token,
    reports_hash,
    seal_package,
    verify_build_token,
    verify_proof,
)
from vela.worker import Receipt, WorkerCore
from vela.worker.core import NO_FREE_SLOT

ISSUER = "test-server"
HOST = "w1"
SECRET = "s3cr3t-Value-for-tests-42"
START, STEP, LOG, FINISH = (BuildAction.START.value, BuildAction.STEP_UPDATE.value,
                            BuildAction.LOG_APPEND.value, BuildAction.FINISH.value)


def pipeline(*steps: tuple[str, list[str]], secrets: tuple[str, ...] = ()) -> str:
    lines = ['version: "1"', "steps:"]
    for name, commands in steps:
        lines += [f"  - name: {name}", "    commands:"]
        lines += [f"      - {json.dumps(c)}" for c in commands]
        if secrets:
            lines.append(f"    secrets: [{', '.join(secrets)}]")
    return "\n".join(lines) + "\n"


def one_step(*commands: str) -> str:
    return pipeline(("main", list(commands)))


class Clock:
    """Real time, movable forward (proofs and tokens need a believable now)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@dataclass(frozen=True)
class Report:
    build_id: int
    action: str
    payload: dict[str, Any]
    proof: str  # the proof of the call it came in (one per call, over all its reports)


class FakeServer:
    """An in-memory ServerLink that checks every report call as the server does (token,
    proof of possession over the call's reports, the build's current row) and records
    the good ones."""

    def __init__(self, ring: KeyRing, identity: WorkerIdentity, clock: Clock) -> None:
        self.ring = ring
        self.identity = identity
        self.clock = clock
        self.guard = BuildRequestGuard(issuer=ISSUER, proof_max_age_s=30,
                                       started_at=clock() - timedelta(seconds=5))
        self.jtis: dict[int, str] = {}
        self.ended: set[int] = set()
        self.reports: list[Report] = []
        self.calls: list[tuple[str, list[Report]]] = []  # (proof, reports) of good calls
        self.attempt_proofs: list[str] = []  # one per call, the failed ones included
        self.attempt_actions: list[list[str]] = []  # the actions of each call, likewise
        self.failed_calls = 0
        self.refused: list[tuple[int, str, str]] = []  # build, first action, reason
        self.fail: Callable[[int, str], Exception | None] | None = None
        self.hang: asyncio.Event | None = None  # set: reports hang until it is set
        self.changed = asyncio.Condition()

    def package(self, build_id: int, text: str, *, worker: str = HOST,
                secrets: dict[str, str] | None = None, ttl_s: int = 60,
                current: bool = True) -> dict[str, Any]:
        """A sealed package; ``current``: its token becomes the build's (else a stale one)."""
        now = self.clock()
        token, claims = mint_build_token(self.ring, issuer=ISSUER, build_id=build_id,
                                         worker=worker, jkt=self.identity.thumbprint,
                                         timeout_s=60, grace_s=10, now=now)
        if current:
            self.jtis[build_id] = claims.jti
        return seal_package(
            ring=self.ring, server_id=ISSUER, build_id=build_id, worker=worker,
            worker_seal_key=self.identity.seal_public_key,
            build={"build_id": build_id, "repo": "acme/app", "build_number": 3,
                   "route": "vela", "timeout_s": 60},
            executable=compile_pipeline(text).to_json(), secrets=secrets or {},
            build_token=token, now=now, ttl_s=ttl_s).to_wire()

    def revoke(self, build_id: int) -> None:
        """As when the server re-dispatches the build: its token is no longer current."""
        self.jtis[build_id] = "revoked"

    async def execute(self, core: WorkerCore, package: dict[str, Any]) -> Receipt:
        """``execute_package`` as the Scheduler calls it: the start that comes back with
        an accepted receipt is checked and recorded like any report, before the build's
        later reports; a refused one stops the build on the worker."""
        receipt = await core.execute_package(package)
        if receipt.accepted and receipt.start is not None:
            start = receipt.start
            try:
                if set(start) != {"reports", "proof"}:  # as the Scheduler refuses it
                    raise Rejected(Reason.MALFORMED, "signed reports are reports and a proof")
                self._record(receipt.build_id, package["build_token"], start["proof"],
                             start["reports"])
            except Rejected:
                core.cancel(receipt.build_id)
        return receipt

    async def send_reports(self, *, build_id: int, token: str, proof: str,
                           reports: list[dict[str, Any]]) -> None:
        """All of a call's reports are checked, with its one proof, before any is
        recorded, as the server does."""
        self.attempt_proofs.append(proof)
        self.attempt_actions.append([r["action"] for r in reports])
        if self.hang is not None:
            await self.hang.wait()
        for r in reports:
            if self.fail is not None and (err := self.fail(build_id, r["action"])) is not None:
                self.failed_calls += 1
                raise err
        self._record(build_id, token, proof, reports)

    def _record(self, build_id: int, token: str, proof: str,
                reports: list[dict[str, Any]]) -> None:
        # The payloads as they arrived, as the Scheduler reads them off the wire.
        got = [(r["action"], json.loads(json.dumps(r["payload"]))) for r in reports]
        try:
            now = self.clock()
            self.guard.check(
                token=token, proof=proof, reports=got,
                keys=self.ring.verifying_keys(now), build_id=build_id,
                build_status=BuildStatus.SUCCESS if build_id in self.ended
                else BuildStatus.RUNNING,
                build_worker=HOST, build_token_jti=self.jtis.get(build_id),
                worker_sign_key=self.identity.sign_public_key, now=now)
            call = [Report(build_id, action, payload, proof) for action, payload in got]
            self.calls.append((proof, call))
            self.reports += call
        except Rejected as e:
            self.refused.append((build_id, got[0][0] if got else "", e.reason.value))
            raise
        finally:
            asyncio.get_running_loop().create_task(self._notify())

    def proof_covers(self, token: str, build_id: int, proof: str,
                     reports: list[Report]) -> None:
        """Check ``proof`` anew (its own replay cache) for a call of ``reports`` on
        ``build_id`` made with ``token``; :class:`Rejected` if it does not cover them."""
        now = self.clock()
        claims = verify_build_token(token, keys=self.ring.verifying_keys(now), issuer=ISSUER,
                                    now=now)
        verify_proof(proof, token=token, claims=claims,
                     worker_sign_key=self.identity.sign_public_key,
                     reports_digest=reports_hash([(r.action, r.payload) for r in reports]),
                     build_id=build_id,
                     cache=ReplayCache(max_age_s=30, started_at=now - timedelta(seconds=60)),
                     now=now)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def until(self, predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout_s)
        return predicate()

    def of(self, build_id: int, action: str | None = None) -> list[Report]:
        return [r for r in self.reports
                if r.build_id == build_id and (action is None or r.action == action)]

    def finish(self, build_id: int) -> dict[str, Any] | None:
        done = self.of(build_id, FINISH)
        return done[0].payload if done else None

    def lines(self, build_id: int, number: int) -> list[str]:
        return [line for r in self.of(build_id, LOG) if r.payload["number"] == number
                for line in r.payload["lines"]]


class Gate:
    """A file a step waits for: the build goes on when the test opens it."""

    def __init__(self, where: Path) -> None:
        self.path = where / "gate"

    @property
    def wait(self) -> str:
        return f"while [ ! -e '{self.path}' ]; do sleep 0.02; done"

    def open(self) -> None:
        self.path.touch()


async def eventually(predicate: Callable[[], Any], timeout_s: float = 10.0) -> None:
    """Poll a condition that no event announces, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def identity() -> WorkerIdentity:
    return WorkerIdentity.generate()


@pytest.fixture
def ring(clock) -> KeyRing:
    return KeyRing.generate(clock() - timedelta(days=1))


@pytest.fixture
def server(ring, identity, clock) -> FakeServer:
    return FakeServer(ring, identity, clock)


@pytest.fixture
def gate(tmp_path) -> Gate:
    return Gate(tmp_path)


@pytest.fixture
async def make_core(tmp_path, identity, ring, server, clock):
    cores: list[WorkerCore] = []
    workspace = tmp_path / "ws"

    def _make(**over: Any) -> WorkerCore:
        settings: dict[str, Any] = dict(
            hostname=HOST, routes=["vela"], build_limit=2, identity=identity,
            pinned_server_keys=ring.verifying_keys(clock()), runtime=LocalRuntime(),
            server=server, workspace_root=workspace, clock=clock, flush_s=0.02,
            report_retry_s=0.005, report_deadline_s=5.0)
        settings.update(over)
        core = WorkerCore(**settings)
        cores.append(core)
        return core

    yield _make
    for core in cores:
        await core.close()
        assert core.running == [] and core.free_slots == 0  # closed: takes nothing
    assert not workspace.exists() or list(workspace.iterdir()) == [], "workspace left behind"


@pytest.fixture
def core(make_core) -> WorkerCore:
    return make_core()


async def test_accepted_build_reports_in_order_with_fresh_proofs(core, server, caplog):
    caplog.set_level(logging.DEBUG)
    text = pipeline(
        ("one", ["echo hello", 'echo "len=${#API_KEY}"', 'echo "$API_KEY"',
                 'echo "$VELA_BUILD_ID $VELA_REPO $VELA_BUILD_NUMBER $VELA_ROUTE"']),
        ("two", ["echo two"]), secrets=("api_key",))
    pkg = server.package(1, text, secrets={"api_key": SECRET})
    receipt = await server.execute(core, pkg)
    assert (receipt.accepted, receipt.build_id, receipt.reason) == (True, 1, None)
    assert receipt.as_dict() == {"accepted": True, "build_id": 1, "reason": None,
                                 "message": None, "start": receipt.start}
    # The build's start came back with the receipt, signed like any report call.
    assert receipt.start is not None and set(receipt.start) == {"reports", "proof"}
    assert [r["action"] for r in receipt.start["reports"]] == [START]
    assert receipt.start["proof"] not in repr(receipt)
    await server.until(lambda: server.finish(1))
    await core.wait_idle(5)
    assert core.running == [] and core.free_slots == 2

    reports = server.of(1)
    assert reports[0].action == START and set(reports[0].payload) == {"started_at"}
    assert reports[-1].action == FINISH
    assert reports[-1].payload == {**reports[-1].payload, "status": "success", "reason": None,
                                   "message": None}
    assert set(reports[-1].payload) == {"status", "reason", "message", "finished_at"}
    steps = [(r.payload["number"], r.payload["status"]) for r in reports
             if r.action == STEP]
    assert steps == [(1, "running"), (1, "success"), (2, "running"), (2, "success")]
    started = next(r for r in reports if r.action == STEP and r.payload["status"] == "running")
    assert set(started.payload) == {"number", "status", "started_at"}
    done = next(r for r in reports if r.action == STEP and r.payload["status"] == "success")
    assert done.payload == {**done.payload, "number": 1, "exit_code": 0, "reason": None}
    assert set(done.payload) == {"number", "status", "exit_code", "reason", "finished_at"}
    # Each step's logs come between its "running" and its end.
    kinds = [(r.action, r.payload.get("number"), r.payload.get("status")) for r in reports]
    for number in (1, 2):
        first = kinds.index((STEP, number, "running"))
        last = kinds.index((STEP, number, "success"))
        logs = [i for i, k in enumerate(kinds) if k[:2] == (LOG, number)]
        assert logs and first < min(logs) and max(logs) < last

    # The secret reached the step, masked in everything reported.
    assert server.lines(1, 1) == ["hello", f"len={len(SECRET)}", MASK, "1 acme/app 3 vela"]
    assert server.lines(1, 2) == ["two"]
    assert SECRET not in json.dumps([r.payload for r in reports])
    # Every call carried its own fresh proof (the guard refuses replays), and each
    # verifies with the reports it came with, and only with them.
    assert server.refused == [] and [r for _, call in server.calls for r in call] == reports
    proofs = [proof for proof, _ in server.calls]
    assert len(set(proofs)) == len(proofs) == len(server.attempt_proofs) + 1  # + the start
    assert proofs[0] == receipt.start["proof"] and proofs[1:] == server.attempt_proofs
    pkg_token = pkg["build_token"]
    for proof, call in server.calls:
        server.proof_covers(pkg_token, 1, proof, call)
    (_, start_call), (_, next_call), *_ = server.calls
    with pytest.raises(Rejected) as e:
        server.proof_covers(pkg_token, 1, proofs[0], next_call)
    assert e.value.reason is Reason.PROOF_WRONG_ACTION
    with pytest.raises(Rejected) as e:
        server.proof_covers(pkg_token, 1, proofs[1], start_call + next_call)
    assert e.value.reason is Reason.PROOF_WRONG_ACTION
    for text_out in (repr(core), caplog.text, json.dumps(core.status())):
        assert SECRET not in text_out
        assert all(p not in text_out for p in proofs)
    assert pkg_token not in repr(core) and pkg_token not in caplog.text


def _flip(text: str) -> str:
    return ("B" if text[0] != "B" else "C") + text[1:]


@pytest.mark.parametrize("part", ["executable", "signature", "build"])
async def test_tampered_package_refused(core, server, part, caplog):
    caplog.set_level(logging.DEBUG)
    pkg = server.package(1, one_step("echo hi"), secrets={"api_key": SECRET})
    if part == "executable":
        pkg["executable"] = pkg["executable"].replace("echo hi", "echo HI")
    elif part == "signature":
        pkg["signature"] = _flip(pkg["signature"])
    else:
        pkg["build"] = {**pkg["build"], "timeout_s": 10_000}
    receipt = await core.execute_package(pkg)
    assert (receipt.accepted, receipt.build_id, receipt.reason) == (False, 1, "package_tampered")
    assert SECRET not in (receipt.message or "") and pkg["build_token"] not in receipt.message
    assert SECRET not in caplog.text
    assert core.running == [] and core.free_slots == 2 and server.reports == []


async def test_package_for_another_worker_refused(core, server):
    receipt = await server.execute(core, server.package(1, one_step("echo hi"), worker="w2"))
    assert (receipt.accepted, receipt.reason) == (False, Reason.PACKAGE_NOT_FOR_ME.value)
    assert core.running == []


async def test_expired_package_refused(core, server, clock):
    pkg = server.package(1, one_step("echo hi"), ttl_s=30)
    clock.advance(31)
    receipt = await core.execute_package(pkg)
    assert (receipt.accepted, receipt.reason) == (False, "package_expired")
    assert core.running == [] and server.reports == []


async def test_unpinned_signer_refused_until_pinned(make_core, server, ring, clock):
    core = make_core(pinned_server_keys={})
    pkg = server.package(1, one_step("echo hi"))
    receipt = await core.execute_package(pkg)
    assert receipt.reason == "package_unknown_signer"
    core.pin(ring.verifying_keys(clock()))
    assert (await server.execute(core, server.package(2, one_step("echo hi")))).accepted
    await server.until(lambda: server.finish(2))


@pytest.mark.parametrize(("package", "build_id"), [({}, None), ({"build_id": 4, "x": 1}, 4),
                                                   ({"build_id": "x"}, None)])
async def test_malformed_package_refused_without_raising(core, package, build_id):
    receipt = await core.execute_package(package)
    assert receipt == Receipt(False, build_id, "malformed", receipt.message)


async def test_replayed_package_and_second_package_for_a_running_build(core, server, gate):
    pkg = server.package(1, one_step(gate.wait))
    assert (await server.execute(core, pkg)).accepted
    again = await core.execute_package(pkg)
    assert (again.accepted, again.reason) == (False, "duplicate_package")
    other = await server.execute(core, server.package(1, one_step("echo hi"), current=False))
    assert (other.accepted, other.reason) == (False, "already_running")
    gate.open()
    await core.wait_idle(10)
    # Still a replay after the build ended.
    late = await core.execute_package(pkg)
    assert (late.accepted, late.reason) == (False, "duplicate_package")
    assert len(server.of(1, START)) == 1


async def test_build_limit_holds_under_concurrent_packages(core, server, gate):
    pkgs = [server.package(10 + i, one_step(gate.wait)) for i in range(10)]
    receipts = await asyncio.gather(*(server.execute(core, p) for p in pkgs))
    accepted = [r.build_id for r in receipts if r.accepted]
    assert len(accepted) == 2
    assert {r.reason for r in receipts if not r.accepted} == {"no_free_slot"}
    assert core.running == sorted(accepted) and core.free_slots == 0
    gate.open()
    await server.until(lambda: all(server.finish(b) for b in accepted))
    await core.wait_idle(5)
    assert core.free_slots == 2
    assert all(server.finish(b)["status"] == "success" for b in accepted)
    assert {r.build_id for r in server.reports} == set(accepted)


async def test_drain_refuses_new_packages_and_waits_for_running_builds(core, server, gate):
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    await server.until(lambda: server.of(1, STEP))
    draining = asyncio.create_task(core.drain(10))
    await eventually(lambda: core.draining)
    late = await server.execute(core, server.package(2, one_step("echo hi")))
    assert (late.accepted, late.reason) == (False, "draining")
    assert core.free_slots == 0 and core.status()["draining"] is True
    assert not draining.done()
    gate.open()
    await asyncio.wait_for(draining, 10)
    assert core.running == [] and server.finish(1)["status"] == "success"
    assert server.of(2) == []


async def test_drain_times_out_while_a_build_runs(core, server, gate):
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    with pytest.raises(TimeoutError):
        await core.drain(0.05)
    assert core.running == [1]
    gate.open()
    await core.wait_idle(10)


async def test_availability_answer_verifies_and_carries_free_slots(core, server, identity,
                                                                   clock, gate):
    book = ChallengeBook(server_id=ISSUER, ttl_s=10)

    def ask(as_object: bool = False) -> int:
        challenge = book.issue(hostname=HOST, build_id=5, now=clock())
        wire = core.availability(challenge if as_object else challenge.model_dump(mode="json"))
        return book.consume(challenge, Answer.model_validate(wire),
                            sign_public_key=identity.sign_public_key, now=clock())

    assert ask() == 2 and ask(as_object=True) == 2
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    assert ask() == 1
    other = WorkerIdentity.generate()
    challenge = book.issue(hostname=HOST, build_id=5, now=clock())
    with pytest.raises(Rejected) as e:
        book.consume(challenge, Answer.model_validate(core.availability(challenge)),
                     sign_public_key=other.sign_public_key, now=clock())
    assert e.value.reason is Reason.ANSWER_BAD_SIGNATURE
    with pytest.raises(Rejected):
        core.availability({"nonce": "x"})
    gate.open()
    await core.wait_idle(10)


async def test_server_refusing_a_report_stops_the_build_and_frees_the_slot(core, server):
    looping = one_step("while true; do echo tick; sleep 0.02; done")
    assert (await server.execute(core, server.package(1, looping))).accepted
    await server.until(lambda: server.lines(1, 1))
    server.revoke(1)  # e.g. canceled on the server, or dispatched elsewhere
    await core.wait_idle(10)  # the endless step was stopped
    assert core.free_slots == 2
    assert server.refused and {r[2] for r in server.refused} == {"token_revoked"}
    assert len(server.refused) == 1  # nothing more was tried once refused
    assert server.finish(1) is None


@pytest.mark.parametrize("reason", [Reason.PROOF_STALE, Reason.PROOF_REPLAYED])
async def test_refused_proofs_are_signed_afresh_and_the_build_goes_on(core, server, reason):
    """A refusal of the proofs alone (the server's TokenAuthority restarted between
    signing and checking) is not the end of the build: the reports go again with fresh
    proofs, which pass."""
    refusals: list[str] = []

    def once(build_id: int, action: str) -> Exception | None:
        if action == FINISH and not refusals:
            refusals.append(action)
            return Rejected(reason, "made before the restart")
        return None

    server.fail = once
    assert (await server.execute(core, server.package(1, one_step("echo hi")))).accepted
    await server.until(lambda: server.finish(1))
    assert server.finish(1)["status"] == "success" and server.failed_calls == 1
    proofs = server.attempt_proofs  # one per call
    assert len(proofs) == len(set(proofs))  # the second attempt signed afresh
    refused_at = next(i for i, actions in enumerate(server.attempt_actions) if FINISH in actions)
    assert server.attempt_actions[refused_at + 1] == server.attempt_actions[refused_at]
    await core.wait_idle(10)


async def test_build_ended_on_the_server_is_not_finished_twice(core, server, gate):
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    await server.until(lambda: server.of(1, STEP))
    server.ended.add(1)
    gate.open()
    await core.wait_idle(10)
    assert [r[2] for r in server.refused] == ["build_ended"]
    assert server.finish(1) is None


async def test_refused_start_stops_the_build(core, server, tmp_path):
    """The server refuses the start that came with the receipt (the build was canceled
    or dispatched again meanwhile) and cancels the build: its steps never run, and
    nothing it reports afterwards is taken."""
    marker = tmp_path / "ran"
    pkg = server.package(1, one_step(f"touch '{marker}'"))
    server.revoke(1)
    assert (await server.execute(core, pkg)).accepted
    await core.wait_idle(10)
    assert server.refused[0][1:] == (START, "token_revoked")
    assert {r[2] for r in server.refused} == {"token_revoked"}
    assert server.reports == [] and not marker.exists()


async def test_transient_report_errors_are_retried(core, server):
    failures = {STEP: 3, LOG: 1, FINISH: 2}
    budget = dict(failures)

    def flaky(build_id: int, action: str) -> Exception | None:
        if budget[action] > 0:
            budget[action] -= 1
            return ConnectionError("server restarting")
        return None

    server.fail = flaky
    assert (await server.execute(core, server.package(1, one_step("echo hi")))).accepted
    await server.until(lambda: server.finish(1))
    assert server.finish(1)["status"] == "success"
    assert budget == dict.fromkeys(failures, 0)
    assert [r.action for r in server.of(1)][:2] == [START, STEP]
    assert server.lines(1, 1) == ["hi"]
    # A fresh proof on every attempt (one per call), the failed ones included.
    assert server.failed_calls == sum(failures.values())
    proofs = server.attempt_proofs
    assert len(set(proofs)) == len(proofs) == len(server.attempt_actions)
    assert {r.proof for r in server.reports if r.action != START} <= set(proofs)


async def test_step_reports_do_not_hold_up_the_build(core, server, tmp_path):
    """Only build.start and build.finish wait for the server: with the server stalled
    after the start, the step still runs; its reports follow, in order, once it answers."""
    go, marker = tmp_path / "go", tmp_path / "ran"
    original = server.send_reports

    async def stall_after_start(**kw: Any) -> None:
        if kw["reports"][0]["action"] != START:
            server.hang = server.hang or asyncio.Event()
        await original(**kw)

    server.send_reports = stall_after_start  # type: ignore[method-assign]
    script = f"while [ ! -e '{go}' ]; do sleep 0.01; done; touch '{marker}'"
    assert (await server.execute(core, server.package(1, one_step(script)))).accepted
    await eventually(lambda: server.hang is not None)  # its "running" report hangs...
    go.touch()
    await eventually(marker.exists)  # ...and the step runs to its end meanwhile
    assert [r.action for r in server.of(1)] == [START]
    assert server.hang is not None
    server.hang.set()
    await server.until(lambda: server.finish(1))
    steps = [r.payload["status"] for r in server.of(1, STEP)]
    assert [r.action for r in server.of(1)] == [START, STEP, STEP, FINISH]
    assert steps == ["running", "success"]


async def test_a_build_reporting_its_end_holds_no_slot(make_core, server):
    """Once its steps are over, a build whose end is still on its way holds no slot:
    the server frees the slot when it writes the end and may offer it again before
    the reply is back here. The build stays listed as running until the end is in."""
    core = make_core(build_limit=1)
    original = server.send_reports

    async def hold_the_finish(**kw: Any) -> None:
        if kw["reports"][-1]["action"] == FINISH:
            server.hang = server.hang or asyncio.Event()
        await original(**kw)

    server.send_reports = hold_the_finish  # type: ignore[method-assign]
    assert (await server.execute(core, server.package(1, one_step("true")))).accepted
    await eventually(lambda: server.hang is not None)
    assert core.running == [1] and core.free_slots == 1
    assert server.hang is not None
    server.send_reports = original  # type: ignore[method-assign]
    assert (await server.execute(core, server.package(2, one_step("true")))).accepted
    assert core.free_slots == 0
    refused = await server.execute(core, server.package(3, one_step("true")))
    assert (refused.accepted, refused.reason) == (False, NO_FREE_SLOT)
    server.hang.set()
    await server.until(lambda: server.finish(1) and server.finish(2))
    await core.wait_idle(10)


async def test_a_short_steps_reports_travel_with_the_finish(core, server):
    core._linger_s = 60.0  # a step's report waits for the next that must go at once
    assert (await server.execute(core, server.package(1, one_step("echo hi")))).accepted
    await server.until(lambda: server.finish(1))
    # build.start came with the receipt; everything else in one call, with one proof.
    assert server.attempt_actions == [[STEP, LOG, STEP, FINISH]]
    assert len(server.attempt_proofs) == 1
    assert [r.action for r in server.of(1)] == [START, STEP, LOG, STEP, FINISH]


@pytest.mark.parametrize("change", ["payload", "dropped", "added", "reordered"])
async def test_reports_changed_after_signing_are_refused(core, server, change):
    """A call's proof covers its reports, payloads and order included: reports changed
    on the way (a line rewritten, a report dropped, added or moved) are refused as a
    whole, and the build stops."""
    core._linger_s = 60.0  # the step's reports travel with the finish, in one call
    original = server.send_reports

    async def tamper(**kw: Any) -> None:
        reports = [dict(r) for r in kw["reports"]]
        if change == "payload":
            (log,) = [r for r in reports if r["action"] == LOG]
            log["payload"] = {**log["payload"], "lines": ["forged"]}
        elif change == "dropped":
            del reports[1]
        elif change == "added":
            reports.insert(1, dict(reports[1]))
        else:
            reports[0], reports[1] = reports[1], reports[0]
        await original(**{**kw, "reports": reports})

    server.send_reports = tamper  # type: ignore[method-assign]
    assert (await server.execute(core, server.package(1, one_step("echo hi")))).accepted
    await server.until(lambda: server.refused)
    await core.wait_idle(10)
    assert [r[2] for r in server.refused] == [Reason.PROOF_WRONG_ACTION.value]
    assert len(server.attempt_proofs) == 1  # not retried: the build was stopped
    assert [r.action for r in server.of(1)] == [START] and server.finish(1) is None


async def test_server_unreachable_past_the_deadline_stops_the_build(make_core, server):
    core = make_core(report_deadline_s=0.1)
    server.fail = lambda build_id, action: ConnectionError("down")
    endless = one_step("while true; do echo tick; sleep 0.02; done")
    assert (await server.execute(core, server.package(1, endless))).accepted
    await core.wait_idle(10)  # the endless step was stopped
    assert [r.action for r in server.reports] == [START]
    assert len(server.attempt_proofs) > 1


async def test_cancel_ends_the_build_canceled(core, server, gate):
    # Not here yet: the stop may have overtaken the package, which is then refused.
    assert core.cancel(9) is False
    early = await server.execute(core, server.package(9, one_step(gate.wait)))
    assert (early.accepted, early.reason) == (False, "stopped_before_it_came")
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    await server.until(lambda: server.of(1, STEP))
    assert core.cancel(1) is True
    await server.until(lambda: server.finish(1))
    assert server.finish(1) == {**server.finish(1), "status": "canceled", "reason": "canceled"}
    steps = [r.payload for r in server.of(1, STEP)]
    assert steps[-1] == {**steps[-1], "number": 1, "status": "canceled", "reason": "canceled"}
    await core.wait_idle(5)
    assert core.cancel(1) is False


async def test_failing_step_finishes_failure(core, server):
    text = pipeline(("bad", ["echo before", "exit 3"]), ("after", ["echo never"]))
    assert (await server.execute(core, server.package(1, text))).accepted
    await server.until(lambda: server.finish(1))
    assert server.finish(1) == {**server.finish(1), "status": "failure",
                                "reason": "step_failed"}
    steps = [r.payload for r in server.of(1, STEP)]
    assert steps[1] == {**steps[1], "number": 1, "status": "failure", "exit_code": 3,
                        "reason": "nonzero_exit"}
    assert steps[2] == {**steps[2], "number": 2, "status": "skipped", "exit_code": None,
                        "reason": "step_failed"}
    assert server.lines(1, 1) == ["before"] and server.lines(1, 2) == []


async def test_close_aborts_running_builds_without_a_final_report(core, server, gate):
    ids = [1, 2]
    for b in ids:
        assert (await server.execute(core, server.package(b, one_step(gate.wait)))).accepted
    await server.until(lambda: all(server.of(b, STEP) for b in ids))
    await asyncio.wait_for(core.close(), 10)
    assert core.running == [] and core.draining
    assert all(server.finish(b) is None for b in ids)
    late = await server.execute(core, server.package(3, one_step("echo hi")))
    assert late.reason == "draining"


@pytest.mark.parametrize("ticks", [0, 3])
async def test_close_right_after_accepting_frees_the_slot(core, server, ticks):
    assert (await server.execute(core, server.package(1, one_step("echo hi")))).accepted
    for _ in range(ticks):  # let the build's task begin (its workspace is being made)
        await asyncio.sleep(0)
    await core.close()
    assert core.running == []
    assert [r.action for r in server.reports] == [START]
    await core.wait_idle(1)


async def test_close_cuts_short_a_report_hanging_on_the_link(core, server, gate, monkeypatch):
    monkeypatch.setattr("vela.worker.core.CLOSE_GRACE_S", 0.1)
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    await server.until(lambda: server.of(1, STEP))
    server.hang = asyncio.Event()  # never set: the server stopped answering
    gate.open()  # the step ends and its report hangs
    await eventually(lambda: sum(map(len, server.attempt_actions)) > len(server.reports))
    await asyncio.wait_for(core.close(), 10)
    assert core.running == [] and server.finish(1) is None


# -- the backlog: packages held beyond the slots -------------------------------------


async def test_a_backlog_holds_packages_until_a_slot_frees(make_core, server, gate):
    """With ``backlog`` the worker takes that many packages beyond its slots and starts
    each when a slot frees; a held build reports nothing and runs nothing until then,
    and reports its own start (its receipt carries none)."""
    core = make_core(build_limit=1, backlog=2)
    receipts = [await server.execute(core, server.package(b, one_step(gate.wait)))
                for b in (1, 2, 3, 4)]
    assert [r.accepted for r in receipts] == [True, True, True, False]
    assert receipts[0].start is not None
    assert receipts[1].start is None and receipts[2].start is None
    assert receipts[3].reason == NO_FREE_SLOT and "backlog of 2 is full" in receipts[3].message
    await server.until(lambda: server.of(1, STEP))
    status = core.status()
    assert status["running"] == [1, 2, 3] and status["held"] == [2, 3]
    assert status["free_slots"] == 0 == core.free_slots
    assert server.of(2) == [] and server.of(3) == []
    gate.open()
    await server.until(lambda: all(server.finish(b) for b in (1, 2, 3)))
    for b in (2, 3):
        assert server.finish(b)["status"] == "success"
        assert [r.action for r in server.of(b)][0] == START
    # One slot: each held build's step began after the one before had finished.
    finished = [server.of(b, STEP)[-1].payload["finished_at"] for b in (1, 2, 3)]
    began = [server.of(b, STEP)[0].payload["started_at"] for b in (1, 2, 3)]
    assert finished[0] <= began[1] and finished[1] <= began[2]
    await core.wait_idle(10)
    assert core.free_slots == 3 and core.status()["held"] == []


async def test_a_held_build_is_dropped_when_stopped_and_reports_nothing(make_core, server,
                                                                        gate):
    core = make_core(build_limit=1, backlog=1)
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    held = await server.execute(core, server.package(2, one_step("echo never")))
    assert held.accepted and held.start is None
    assert core.cancel(2) is True
    await eventually(lambda: core.running == [1])
    assert core.status()["held"] == [] and core.free_slots == 1
    gate.open()
    await server.until(lambda: server.finish(1))
    await core.wait_idle(10)
    assert server.of(2) == []


async def test_a_held_build_whose_token_died_meanwhile_runs_nothing(make_core, server,
                                                                    gate):
    """The server dispatched the held build again (or ended it) while it waited: its
    token is no longer the build's, so its start is refused and no step runs."""
    core = make_core(build_limit=1, backlog=1)
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    assert (await server.execute(core, server.package(2, one_step("echo ran")))).accepted
    server.revoke(2)
    gate.open()
    await server.until(lambda: server.finish(1) and server.refused)
    await core.wait_idle(10)
    assert server.refused == [(2, START, "token_revoked")]
    assert server.of(2) == []


async def test_a_held_build_is_given_up_before_its_token_runs_short(make_core, server,
                                                                    clock, gate, caplog):
    """A held build waits at most half the slack its token has beyond the build's
    timeout, keeping the other half for its reports; then it is given up unstarted
    (the server queues it again when it sees it gone from the worker)."""
    core = make_core(build_limit=1, backlog=1)
    assert (await server.execute(core, server.package(1, one_step(gate.wait)))).accepted
    held = server.package(2, one_step("echo late"))  # token: 60 s timeout + 10 s grace
    clock.advance(9)  # 1 s of slack left: it may wait 0.5 s
    assert (await server.execute(core, held)).accepted
    assert core.running == [1, 2]
    caplog.set_level(logging.INFO, logger="vela.worker")
    await eventually(lambda: core.running == [1])
    assert core.status()["held"] == [] and core.free_slots == 1
    assert "build 2 given up before it started (no slot freed in time)" in caplog.text
    assert core.status()["given_up"] == [2]  # for the server's health check
    gate.open()
    await server.until(lambda: server.finish(1))
    await core.wait_idle(10)
    assert server.of(2) == []
