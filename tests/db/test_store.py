"""The store on SQLite and PostgreSQL: CRUD, compare-and-set, encryption at rest."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update

from vela.db.models import Secret
from vela.db.store import StepSpec, Store, utcnow
from vela.domain import BuildStatus, StepStatus
from vela.errors import Conflict, InvalidTransition, NotFound, VelaError


@pytest.fixture
def store(engine, master_key):
    return Store(engine, master_key)


async def new_build(store: Store, repo: str = "octo/hello", steps: int = 2):
    return await store.create_build(
        repo, executable='{"steps": []}',
        steps=[StepSpec(i + 1, f"s{i + 1}") for i in range(steps)], timeout_s=60)


async def test_build_numbers_count_per_repo(store):
    a1 = await new_build(store, "octo/a")
    a2 = await new_build(store, "octo/a")
    b1 = await new_build(store, "octo/b")
    assert (a1.number, a2.number, b1.number) == (1, 2, 1)
    assert a1.status == BuildStatus.PENDING and a1.timeout_s == 60
    assert [s.status for s in await store.get_steps(a1.id)] == ["pending", "pending"]


async def test_written_rows_come_back_as_detached_objects_equal_to_a_fresh_read(store):
    """The writes run as plain SQL and build their objects from the returned rows: the
    objects must be what a read gives, and detached (never re-inserted if added)."""
    from sqlalchemy import inspect

    b = await new_build(store)
    run = await store.transition_build(b.id, BuildStatus.PENDING, BuildStatus.RUNNING,
                                       worker="w1", token_jti="j1", attempts=1)
    step = await store.update_step(b.id, 1, StepStatus.RUNNING)
    fresh = await store.get_build(b.id)
    columns = [c.key for c in inspect(type(fresh)).columns]
    assert [getattr(run, c) for c in columns] == [getattr(fresh, c) for c in columns]
    assert (await store.get_steps(b.id))[0].started_at == step.started_at
    for obj in (b, run, step):
        assert inspect(obj).detached


async def test_repo_name_must_have_org(store):
    with pytest.raises(VelaError, match="org/name"):
        await new_build(store, "nothing")


async def test_transition_cas_and_rules(store):
    b = await new_build(store)
    with pytest.raises(InvalidTransition):
        await store.transition_build(b.id, BuildStatus.PENDING, BuildStatus.SUCCESS)
    run = await store.transition_build(b.id, BuildStatus.PENDING, BuildStatus.RUNNING,
                                       worker="w1", token_jti="j1", dispatched_at=utcnow())
    assert run.status == "running" and run.worker == "w1"
    with pytest.raises(Conflict, match="is running, not pending"):
        await store.transition_build(b.id, BuildStatus.PENDING, BuildStatus.RUNNING)
    # A guard on the token id: a stale token cannot finish the build.
    with pytest.raises(Conflict):
        await store.transition_build(b.id, BuildStatus.RUNNING, BuildStatus.SUCCESS,
                                     only_if={"token_jti": "other"})
    done = await store.transition_build(b.id, BuildStatus.RUNNING, BuildStatus.ERROR,
                                        only_if={"token_jti": "j1"}, reason="worker_lost")
    assert done.status == "error" and done.reason == "worker_lost" and done.finished_at
    assert {s.status for s in await store.get_steps(b.id)} == {"skipped"}
    with pytest.raises(NotFound):
        await store.transition_build(9999, BuildStatus.PENDING, BuildStatus.RUNNING)


async def test_a_build_that_ends_ends_its_steps(store):
    """Done steps stay as they are, the running one ends with the build (and gets an
    end time), the ones never run are skipped."""
    b = await new_build(store, steps=3)
    await store.transition_build(b.id, BuildStatus.PENDING, BuildStatus.RUNNING, worker="w1")
    await store.update_step(b.id, 1, StepStatus.RUNNING)
    await store.update_step(b.id, 1, StepStatus.SUCCESS, exit_code=0)
    await store.update_step(b.id, 2, StepStatus.RUNNING)
    await store.transition_build(b.id, BuildStatus.RUNNING, BuildStatus.CANCELED)
    one, two, three = await store.get_steps(b.id)
    assert (one.status, one.exit_code) == ("success", 0)
    assert two.status == "canceled" and two.finished_at >= two.started_at
    assert three.status == "skipped" and three.finished_at is None


async def test_build_and_worker_key_in_one_read(store):
    b = await new_build(store)
    build, key = await store.build_and_worker_key(b.id)
    assert (build.id, build.worker, key) == (b.id, None, None)
    await store.upsert_worker("w1", routes=["vela"], build_limit=1, sign_public_key="sig-key",
                              seal_public_key="seal-key", key_thumbprint="thumb")
    await store.transition_build(b.id, BuildStatus.PENDING, BuildStatus.RUNNING, worker="w1")
    build, key = await store.build_and_worker_key(b.id)
    assert (build.id, build.worker, key) == (b.id, "w1", "sig-key")
    await store.transition_build(b.id, BuildStatus.RUNNING, BuildStatus.ERROR, worker="gone")
    assert (await store.build_and_worker_key(b.id))[1] is None  # no such worker row
    with pytest.raises(NotFound):
        await store.build_and_worker_key(9999)


async def test_concurrent_transitions_exactly_one_wins(store):
    b = await new_build(store)

    async def attempt(i: int) -> str:
        try:
            await store.transition_build(b.id, BuildStatus.PENDING, BuildStatus.RUNNING,
                                         worker=f"w{i}")
            return f"w{i}"
        except Conflict:
            return ""

    results = await asyncio.gather(*(attempt(i) for i in range(20)))
    winners = [r for r in results if r]
    assert len(winners) == 1
    assert (await store.get_build(b.id)).worker == winners[0]


async def test_steps_and_logs(store):
    b = await new_build(store)
    await store.update_step(b.id, 1, StepStatus.RUNNING)
    assert await store.append_log(b.id, 1, ["a", "b"]) == 1
    assert await store.append_log(b.id, 1, ["c"]) == 2
    step = await store.update_step(b.id, 1, StepStatus.SUCCESS, exit_code=0)
    assert step.exit_code == 0 and step.finished_at >= step.started_at
    with pytest.raises(InvalidTransition):
        await store.update_step(b.id, 1, StepStatus.RUNNING)
    logs = await store.get_logs(b.id)
    assert "".join(chunk for _, _, chunk in logs) == "a\nb\nc\n"
    assert await store.get_logs(b.id, after_id=logs[-1][0]) == []
    with pytest.raises(NotFound):
        await store.append_log(b.id, 7, ["x"])


async def test_numbered_log_chunks_are_stored_once(store):
    """A chunk sent again under the number it was stored with (a retry after a lost
    reply) is not stored twice; chunks read back in their senders' order."""
    b = await new_build(store)
    await store.update_step(b.id, 1, StepStatus.RUNNING)
    assert await store.append_log(b.id, 1, ["one"], seq=1) == 1
    assert await store.append_log(b.id, 1, ["two"], seq=2) == 2
    assert await store.append_log(b.id, 1, ["one"], seq=1) == 1
    assert "".join(c for _, _, c in await store.get_logs(b.id)) == "one\ntwo\n"


async def test_secret_encrypted_at_rest_and_never_listed(store, engine):
    await store.put_secret("org", "octo", "", "token", "org-value-123")
    info = await store.put_secret("repo", "octo", "hello", "token", "repo-value-456")
    assert not hasattr(info, "value")
    assert "repo-value-456" not in repr(await store.list_secrets())
    async with engine.connect() as conn:
        raw = b"".join(r[0] for r in await conn.execute(text("SELECT value_enc FROM secrets")))
        dumped = str(list(await conn.execute(text("SELECT * FROM secrets"))))
    assert b"repo-value-456" not in raw and b"org-value-123" not in raw
    assert "value-" not in dumped
    # The repo secret wins over the org secret of the same name.
    assert await store.secrets_for_repo("octo/hello", ["token"]) == {"token": "repo-value-456"}
    assert await store.secrets_for_repo("octo/other", ["token"]) == {"token": "org-value-123"}
    assert await store.secrets_for_repo("evil/hello", ["token"]) == {}


async def test_secret_ciphertext_is_bound_to_its_row(store, engine):
    """Copying one secret's ciphertext onto another row does not decrypt."""
    await store.put_secret("repo", "octo", "a", "k", "alpha")
    await store.put_secret("repo", "octo", "b", "k", "beta")
    async with engine.begin() as conn:
        a = (await conn.execute(select(Secret.value_enc).where(Secret.target == "a"))).scalar()
        await conn.execute(update(Secret).where(Secret.target == "b").values(value_enc=a))
    with pytest.raises(VelaError, match="does not decrypt"):
        await store.secrets_for_repo("octo/b", ["k"])


async def test_secret_update_and_delete(store):
    await store.put_secret("repo", "octo", "hello", "k", "v1")
    await store.put_secret("repo", "octo", "hello", "k", "v2")
    assert await store.secrets_for_repo("octo/hello", ["k"]) == {"k": "v2"}
    assert len(await store.list_secrets(org="octo")) == 1
    await store.delete_secret("repo", "octo", "hello", "k")
    with pytest.raises(NotFound):
        await store.delete_secret("repo", "octo", "hello", "k")
    with pytest.raises(VelaError, match="scope"):
        await store.put_secret("galaxy", "octo", "hello", "k", "v")


async def test_a_shared_secret_reaches_only_repos_of_its_org_on_its_allowlist(store, engine):
    info = await store.put_secret("shared", "acme", "ops", "deploy_key", "team-value-789",
                                  repo_allowlist=["acme/web", "acme/api", "acme/web"])
    assert info.repo_allowlist == ("acme/api", "acme/web")
    key = "acme/ops/deploy_key"
    assert await store.secrets_for_repo("acme/web", [key]) == {key: "team-value-789"}
    assert await store.secrets_for_repo("acme/cli", [key]) == {}  # not on the allowlist
    assert await store.secrets_for_repo("evil/web", [key]) == {}  # another org
    # Its name alone is no repo or org secret's name.
    assert await store.secrets_for_repo("acme/web", ["deploy_key"]) == {}
    # Deny by default: without an allowlist no repo gets it.
    await store.put_secret("shared", "acme", "ops", "bare", "bare-value")
    assert await store.secrets_for_repo("acme/web", ["acme/ops/bare"]) == {}
    async with engine.connect() as conn:
        raw = b"".join(r[0] for r in await conn.execute(text("SELECT value_enc FROM secrets")))
    assert b"team-value" not in raw
    assert "team-value" not in repr(await store.list_secrets(org="acme"))


async def test_a_shared_secret_is_never_given_to_another_org(store, engine):
    """Its allowlist names repos of its own org only; a row that says otherwise (written
    past the store) still gives nothing to another org's repo."""
    with pytest.raises(VelaError, match="repos of org evil"):
        await store.put_secret("shared", "evil", "ops", "x", "v", repo_allowlist=["acme/web"])
    await store.put_secret("shared", "evil", "ops", "x", "evil-value",
                           repo_allowlist=["evil/web"])
    async with engine.begin() as conn:
        await conn.execute(update(Secret).where(Secret.org == "evil")
                           .values(repo_allowlist=["acme/web", "evil/web"]))
    assert await store.secrets_for_repo("acme/web", ["evil/ops/x"]) == {}
    assert await store.secrets_for_repo("evil/web", ["evil/ops/x"]) == {
        "evil/ops/x": "evil-value"}


async def test_a_repo_secret_of_the_same_name_does_not_shadow_a_named_shared_one(store):
    await store.put_secret("repo", "acme", "web", "token", "repo-value")
    await store.put_secret("org", "acme", "*", "token", "org-value")
    await store.put_secret("shared", "acme", "ops", "token", "team-value",
                           repo_allowlist=["acme/web"])
    assert await store.secrets_for_repo("acme/web", ["token", "acme/ops/token"]) == {
        "token": "repo-value", "acme/ops/token": "team-value"}


async def test_a_shared_secrets_allowlist_and_value_update_apart(store):
    await store.put_secret("shared", "acme", "ops", "k", "v1", repo_allowlist=["acme/a"])
    info = await store.put_secret("shared", "acme", "ops", "k", None, exists=True,
                                  repo_allowlist=["acme/b"])
    assert info.repo_allowlist == ("acme/b",)
    assert await store.secrets_for_repo("acme/b", ["acme/ops/k"]) == {"acme/ops/k": "v1"}
    assert await store.secrets_for_repo("acme/a", ["acme/ops/k"]) == {}
    info = await store.put_secret("shared", "acme", "ops", "k", "v2", exists=True)
    assert info.repo_allowlist == ("acme/b",)  # left as it was
    assert await store.secrets_for_repo("acme/b", ["acme/ops/k"]) == {"acme/ops/k": "v2"}
    info = await store.put_secret("shared", "acme", "ops", "k", None, exists=True,
                                  repo_allowlist=[])
    assert info.repo_allowlist == ()
    assert await store.secrets_for_repo("acme/b", ["acme/ops/k"]) == {}
    with pytest.raises(VelaError, match="value"):
        await store.put_secret("shared", "acme", "ops", "new", None, exists=False)


@pytest.mark.parametrize(("scope", "target", "allowlist", "match"), [
    ("repo", "web", ["acme/web"], "shared secrets only"),
    ("org", "*", ["acme/web"], "shared secrets only"),
    ("shared", "ops", ["web"], "org/name"),
    ("shared", "ops", ["acme/web/x"], "org/name"),
    ("shared", "ops", ["acme/*"], "org/name"),
    ("shared", "ops", [f"acme/r{i}" for i in range(101)], "at most 100"),
])
async def test_a_bad_allowlist_is_refused(store, scope, target, allowlist, match):
    with pytest.raises(VelaError, match=match):
        await store.put_secret(scope, "acme", target, "k", "v", repo_allowlist=allowlist)
    assert await store.list_secrets(org="acme") == []


async def test_workers(store):
    w = await store.upsert_worker("h1", routes=["vela"], build_limit=2, sign_public_key="s",
                                  seal_public_key="x", key_thumbprint="t", actor_name="a")
    assert w.status == "idle" and w.active and w.running_builds == []
    await store.update_worker("h1", status="busy", running_builds=[1, 2])
    got = await store.get_worker("h1")
    assert got.status == "busy" and got.running_builds == [1, 2]
    await store.upsert_worker("h1", routes=["gpu"], build_limit=3, sign_public_key="s2",
                              seal_public_key="x2", key_thumbprint="t2")
    got = await store.get_worker("h1")
    assert got.routes == ["gpu"] and got.build_limit == 3 and got.registered_at == w.registered_at
    with pytest.raises(NotFound):
        await store.update_worker("nope", status="idle")


async def test_registration_token_single_use(store):
    now = utcnow()
    await store.create_registration_token(token_hash="h" * 64, routes=["vela"], hostname=None,
                                          expires_at=now + timedelta(minutes=5))
    await store.create_registration_token(token_hash="e" * 64, routes=["vela"], hostname=None,
                                          expires_at=now - timedelta(seconds=1))
    results = await asyncio.gather(*(store.use_registration_token("h" * 64, used_by=f"w{i}",
                                                                  now=now) for i in range(5)))
    assert results.count(True) == 1
    assert not await store.use_registration_token("e" * 64, used_by="w", now=now)
    row = await store.get_registration_token("h" * 64)
    assert row.used_at is not None and row.expires_at.tzinfo is not None


async def test_package_rows_in_one_read(store):
    b = await new_build(store, "octo/pkg")
    await store.upsert_worker("w1", routes=["vela"], build_limit=1, sign_public_key="sig-key",
                              seal_public_key="seal-key", key_thumbprint="thumb")
    build, repo, worker = await store.package_rows(b.id, "w1")
    assert (build.id, repo.full_name, worker.hostname, worker.seal_public_key) == (
        b.id, "octo/pkg", "w1", "seal-key")
    with pytest.raises(NotFound, match="worker nobody"):
        await store.package_rows(b.id, "nobody")
    with pytest.raises(NotFound, match="build 9999"):
        await store.package_rows(9999, "w1")


async def test_reused_statements_bind_each_calls_values(store):
    """Statements are built once per shape and reused: each call's values apply to its
    own rows only."""
    a, b = await new_build(store, "octo/a"), await new_build(store, "octo/b")
    for build, worker in ((a, "wa"), (b, "wb")):
        await store.transition_build(build.id, BuildStatus.PENDING, BuildStatus.RUNNING,
                                     worker=worker, token_jti=f"j-{worker}")
        await store.update_step(build.id, 1, StepStatus.RUNNING)
    await store.set_build_fields(a.id, enqueued_at=utcnow())
    with pytest.raises(Conflict):  # b's guard value, not a's, is checked for b
        await store.transition_build(b.id, BuildStatus.RUNNING, BuildStatus.SUCCESS,
                                     only_if={"token_jti": "j-wa"})
    await store.transition_build(a.id, BuildStatus.RUNNING, BuildStatus.SUCCESS,
                                 only_if={"token_jti": "j-wa"})
    ra, rb = await store.get_build(a.id), await store.get_build(b.id)
    assert (ra.status, ra.worker, rb.status, rb.worker) == ("success", "wa", "running", "wb")
    assert ra.enqueued_at is not None and rb.enqueued_at is None
    assert [s.status for s in await store.get_steps(a.id)] == ["success", "skipped"]
    assert [s.status for s in await store.get_steps(b.id)] == ["running", "pending"]


async def test_shared_writes_go_in_one_transaction_and_keep_their_own_outcome(
        store, monkeypatch):
    """write_shared: writes made at the same moment commit together; one that fails
    (a lost compare-and-set here) fails alone and none of its writes is kept, while
    the others are written once."""
    a, b, c, d, e = [await new_build(store) for _ in range(5)]
    await store.transition_build(b.id, BuildStatus.PENDING, BuildStatus.CANCELED)
    calls = store._shared
    batches, requests = calls.batches, calls.requests
    transactions = []
    write = store._db.write

    async def counted(unit):
        transactions.append(unit)
        return await write(unit)

    monkeypatch.setattr(store._db, "write", counted)

    def dispatch(build_id: int):
        def unit(w):
            w.append_log(build_id, 1, [f"dispatched {build_id}"])
            return w.transition_build(build_id, BuildStatus.PENDING, BuildStatus.RUNNING,
                                      worker="w1")
        return store.write_shared(unit)

    ra, rb, rc = await asyncio.gather(*(dispatch(x.id) for x in (a, b, c)),
                                      return_exceptions=True)
    assert isinstance(rb, Conflict)
    assert (ra.status, rc.status) == ("running", "running")
    assert (await store.get_build(b.id)).status == "canceled"
    assert [t for _, _, t in await store.get_logs(b.id)] == []  # its log went with it
    assert [t for _, _, t in await store.get_logs(a.id)] == [f"dispatched {a.id}\n"]
    assert (calls.batches - batches, calls.requests - requests) == (1, 3)
    assert len(transactions) == 4  # the shared one, undone, then each on its own
    # Without a failure, one transaction carries them all.
    await asyncio.gather(*(store.transition_build(x.id, BuildStatus.PENDING,
                                                  BuildStatus.RUNNING, shared=True)
                           for x in (d, e)))
    assert (calls.batches - batches, calls.requests - requests) == (2, 5)
    assert len(transactions) == 5


async def test_a_shared_commit_that_fails_is_every_writes_failure_and_never_rerun(
        store, monkeypatch):
    """The commit of a shared transaction lands but its answer is lost (PostgreSQL
    dropped the connection): running its writes again one by one would store two builds
    for one request, or a log chunk twice. Each caller gets the failure instead."""
    from sqlalchemy.exc import DBAPIError

    a, b = await new_build(store), await new_build(store)
    write = store._db.write
    transactions = []

    async def commit_then_lose_the_answer(unit):
        transactions.append(unit)
        out = await write(unit)
        if len(transactions) == 1:
            raise DBAPIError("COMMIT", {}, ConnectionResetError("connection lost"),
                             connection_invalidated=True)
        return out

    monkeypatch.setattr(store._db, "write", commit_then_lose_the_answer)
    results = await asyncio.gather(
        *(store.write_shared(lambda w, i=x.id: w.append_log(i, 1, ["once"])) for x in (a, b)),
        return_exceptions=True)
    assert all(isinstance(r, DBAPIError) for r in results), results
    assert len(transactions) == 1  # not run again
    for x in (a, b):
        assert [t for _, _, t in await store.get_logs(x.id)] == ["once\n"]


async def test_creating_one_secret_twice_at_once_is_one_conflict(store):
    """Create-only and update-only are checked in the write itself: two requests
    creating the same secret at once give one secret and one Conflict (the check before
    the write let both through, and the database's unique key answered a 500)."""
    results = await asyncio.gather(
        *(store.put_secret("repo", "octo", "race", "k", v, exists=False) for v in ("a", "b")),
        return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "SecretInfo"]
    with pytest.raises(NotFound):
        await store.put_secret("repo", "octo", "race", "other", "v", exists=True)
    await store.put_secret("repo", "octo", "race", "k", "c", exists=True)
    assert [s.name for s in await store.list_secrets(org="octo")] == ["k"]
