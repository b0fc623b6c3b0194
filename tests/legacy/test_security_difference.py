"""Why migrate, shown: everything a queueless worker holds cannot read a secret; the
legacy WORKER_SECRET reads any secret of any repo. Cited by docs/security.md."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from tests.legacy.conftest import WORKER_SECRET
from tests.server.conftest import pipeline, report_one
from vela.config import Settings
from vela.db.store import Store
from vela.errors import ConfigError
from vela.security import BuildAction, Reason, Rejected, make_proof
from vela.server.context import ServerContext

MINE = "acme-app-Api-Token-1"
THEIRS = "other-vault-Deploy-Key-2"
ORG = "other-org-Wide-Token-3"
# What someone holding a build token might try, besides the four reporting actions.
SECRET_ACTIONS = ["secret.read", "secrets.read", "secret.get", "build.secrets", "repo.secrets",
                  "package.get", "build.read"]


# Another build's row names no worker or another one: the proof finds no key of ours
# there, or the token names another build.
OTHER_BUILD = {Reason.WRONG_BUILD, Reason.WRONG_WORKER}


async def _seed(fleet) -> None:
    await fleet.store.put_secret("repo", "acme", "app", "api_token", MINE)
    await fleet.store.put_secret("repo", "other", "vault", "deploy_key", THEIRS)
    await fleet.store.put_secret("org", "other", "*", "org_token", ORG)


async def test_queueless_worker_loot_reads_no_secret_legacy_secret_reads_all(mixed):
    await _seed(mixed)
    await mixed.add_worker("w1", routes=("vela",))
    mine = await mixed.submit(pipeline("sleep 30", secrets=("api_token",)), repo="acme/app")
    theirs = await mixed.submit(pipeline("sleep 30", secrets=("deploy_key",)),
                                repo="other/vault")
    await mixed.pump([mine], until=lambda b: b[mine].started_at is not None)

    # Everything the queueless worker holds: its key files, the build token it was
    # given, and the power to sign fresh, valid proofs with its key.
    state_dir = mixed.tmp / "workers" / "w1"
    key_files = [p.read_bytes() for p in state_dir.rglob("*") if p.is_file()
                 and "ws" not in p.relative_to(state_dir).parts]
    assert key_files, "the worker's state dir holds its keys"
    identity = mixed.identity("w1")  # loaded from those files
    token = mixed.tokens[mine]

    def proof(action: str, build_id: int, payload: dict) -> str:
        return make_proof(identity, token=token, reports=[(action, payload)],
                          build_id=build_id, now=datetime.now(UTC))

    # 1. No action of a build token reads a secret: the one authorization path says so.
    wanted = {"repo": "other/vault", "names": ["deploy_key"]}
    for action in SECRET_ACTIONS:
        for target in (mine, theirs):
            with pytest.raises(Rejected) as e:
                await report_one(
                    mixed.scheduler, build_id=target, action=action, token=token,
                    proof=proof(action, target, wanted), payload=wanted)
            assert e.value.reason in ({Reason.FORBIDDEN_ACTION} if target == mine
                                      else OTHER_BUILD)
    # 2. The token cannot act on another build, even with a valid proof for it.
    for action in BuildAction:
        with pytest.raises(Rejected) as e:
            await report_one(mixed.scheduler, build_id=theirs, action=action, token=token,
                             proof=proof(action, theirs, {"status": "success"}),
                             payload={"status": "success"})
        assert e.value.reason in OTHER_BUILD
    assert (await mixed.store.get_build(theirs)).status == "pending"
    # 3. The legacy secrets entry point takes none of it as the worker secret.
    loot = [token, proof("secret.read", mine, wanted), identity.sign_public_key,
            *(f.decode(errors="replace") for f in key_files)]
    for credential in loot:
        with pytest.raises(Rejected) as e:
            await mixed.gateway.secrets(worker_secret=credential, repo="other/vault",
                                        names=["deploy_key"])
        assert e.value.reason is Reason.WORKER_SECRET_INVALID
        with pytest.raises(Rejected) as e:
            await mixed.gateway.claim(worker_secret=credential, hostname="w1",
                                      build_id=theirs)
        assert e.value.reason is Reason.WORKER_SECRET_INVALID

    # The legacy WORKER_SECRET alone: any secret of any repo, no build, no route needed.
    assert await mixed.gateway.secrets(worker_secret=WORKER_SECRET, repo="other/vault",
                                       names=["deploy_key", "org_token"]) == {
        "deploy_key": THEIRS, "org_token": ORG}
    assert await mixed.gateway.secrets(worker_secret=WORKER_SECRET, repo="acme/app",
                                       names=["api_token"]) == {"api_token": MINE}
    await mixed.scheduler.cancel(mine)
    await mixed.scheduler.cancel(theirs)


async def test_server_mode_has_no_legacy_entry_point(engine, tmp_path, master_key):
    """With no legacy route there is no door to try: the gateway cannot be built, even
    with a worker secret configured."""
    settings = Settings.model_validate({
        "server": {"data_dir": str(tmp_path), "worker_secret": WORKER_SECRET}})
    ctx = ServerContext(settings=settings, engine=engine, store=Store(engine, master_key),
                        master_key=master_key)
    await ctx.bootstrap_keys()
    with pytest.raises(ConfigError, match="legacy queue mode is off"):
        await ctx.legacy_gateway()


async def test_worker_secret_cannot_touch_server_mode_builds(mixed):
    """The legacy door stays on legacy routes: the shared secret can neither claim nor
    report on a server-mode build (its secrets it can read, as shown above)."""
    await mixed.add_worker("w1", routes=("vela",))
    build_id = await mixed.submit(pipeline("sleep 30"))
    await mixed.pump([build_id], until=lambda b: b[build_id].started_at is not None)
    with pytest.raises(Rejected) as e:
        await mixed.gateway.claim(worker_secret=WORKER_SECRET, hostname="w1",
                                  build_id=build_id)
    assert e.value.reason is Reason.ROUTE_MODE_MISMATCH
    for action in BuildAction:
        with pytest.raises(Rejected) as e:
            await mixed.gateway.report(worker_secret=WORKER_SECRET, hostname="w1",
                                       build_id=build_id, action=action,
                                       payload={"status": "failure"})
        assert e.value.reason is Reason.ROUTE_MODE_MISMATCH
    assert (await mixed.store.get_build(build_id)).status == "running"
    assert mixed.metrics.rejections["route_mode_mismatch"] == 5
    await mixed.scheduler.cancel(build_id)


async def test_worker_secret_never_shows_in_logs_or_reprs(mixed, caplog):
    caplog.set_level(logging.DEBUG)
    await _seed(mixed)
    legacy = mixed.add_legacy_worker("legacy")
    build_id = await mixed.submit(pipeline('echo "$DEPLOY_KEY"', secrets=("deploy_key",)),
                                  repo="other/vault", route="gpu")
    assert (await mixed.pump([build_id]))[build_id].status == "success"
    thief = mixed.add_legacy_worker("thief", secret=WORKER_SECRET[::-1])
    with pytest.raises(Rejected):
        await thief.connect()
    shown = [r.getMessage() for r in caplog.records]
    shown += [repr(legacy), repr(mixed.gateway), repr(mixed.settings), str(legacy.status()),
              str(mixed.settings.model_dump())]
    for text in shown:
        assert WORKER_SECRET not in text and WORKER_SECRET[::-1] not in text
        assert THEIRS not in text
    logs = "".join(t for _, _, t in await mixed.store.get_logs(build_id))
    assert "***" in logs and THEIRS not in logs
