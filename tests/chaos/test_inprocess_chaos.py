"""Chaos in one event loop (no Ray), where the tokens the workers held can be
replayed afterwards: every token of an ended build must be rejected."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime

import jwt
import pytest

from tests.server.conftest import pipeline, report_one
from vela.domain import BuildStatus
from vela.security import BuildAction, Reason, Rejected, make_proof


async def test_tokens_of_ended_builds_are_dead_after_chaos(system):
    rng = random.Random(int(os.environ.get("VELA_CHAOS_SEED", "11")))
    n = 0

    async def new_worker():
        nonlocal n
        n += 1
        await system.add_worker(f"c{n}", build_limit=2)

    for _ in range(3):
        await new_worker()
    ids = []
    for i in range(24):
        ids.append(await system.submit(pipeline("echo RUN", f"sleep {rng.choice([0, 0.2])}")))
        if i % 6 == 5:
            action = rng.choice(["kill", "restart"])
            if action == "kill":
                alive = [h for h, c in system.directory.clients.items() if not c.dead]
                await system.directory.clients[rng.choice(alive)].kill()
                await new_worker()
            else:
                await system.restart_scheduler()
        await system.listener.run_until_idle(max_passes=5)
    builds = await system.pump(ids, timeout_s=120)
    assert all(BuildStatus(b.status).terminal for b in builds.values())
    assert system.tokens, "workers reported with tokens"
    now = datetime.now(UTC)
    late = {"number": 1, "lines": ["late"]}
    for build_id, token in system.tokens.items():
        # A valid proof, over the very report sent, by the worker the token is bound to.
        hostname = jwt.decode(token, options={"verify_signature": False})["wkr"]
        proof = make_proof(system.identity(hostname), token=token,
                           reports=[(BuildAction.LOG_APPEND, late)], build_id=build_id,
                           now=now)
        with pytest.raises(Rejected) as e:
            await report_one(system.scheduler, build_id=build_id, action=BuildAction.LOG_APPEND,
                             payload=late, token=token, proof=proof)
        assert e.value.reason is not Reason.PROOF_WRONG_ACTION  # refused for the token
    for b in ids:
        text = "".join(t for _, _, t in await system.store.get_logs(b))
        assert text.count("RUN") <= 1 and "late" not in text
