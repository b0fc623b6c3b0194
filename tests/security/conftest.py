"""Fixtures for the security core: an injected clock, keys, workers, a fake store."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from vela.db.models import RegistrationToken, ServerKey, Worker
from vela.domain import BuildStatus
from vela.security import (
    BuildRequestGuard,
    KeyRing,
    WorkerIdentity,
    make_proof,
    mint_build_token,
)

ISSUER = "vela-test-server"
START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ring(clock) -> KeyRing:
    return KeyRing.generate(clock.now - timedelta(days=1))


@pytest.fixture
def worker_a() -> WorkerIdentity:
    return WorkerIdentity.generate()


@pytest.fixture
def worker_b() -> WorkerIdentity:
    return WorkerIdentity.generate()


@dataclass
class Running:
    """A build dispatched to worker ``a`` with its token, as the server's rows say."""

    ring: KeyRing
    guard: BuildRequestGuard
    identity: WorkerIdentity
    token: str
    jti: str
    build_id: int = 7
    worker: str = "a"
    status: BuildStatus = BuildStatus.RUNNING
    registered: dict[str, str] = field(default_factory=dict)  # hostname -> sign key

    def proof(self, clock, *, action="step.update", payload=None, reports=None,
              build_id=None, identity=None, token=None):
        """A proof over ``reports``, by default the one report ``(action, payload)``."""
        return make_proof(identity or self.identity, token=token or self.token,
                          reports=reports or [(action, payload or {})],
                          build_id=self.build_id if build_id is None else build_id,
                          now=clock.now)

    def check(self, clock, *, proof, action="step.update", payload=None, **kw):
        return self.check_all(clock, proof=proof, reports=[(action, payload or {})], **kw)

    def check_all(self, clock, *, proof, reports, token=None, build_id=None, status=None,
                  worker=None, jti=None):
        build_worker = self.worker if worker is None else worker
        return self.guard.check(
            token=self.token if token is None else token, proof=proof, reports=reports,
            keys=self.ring.verifying_keys(clock.now),
            build_id=self.build_id if build_id is None else build_id,
            build_status=status or self.status, build_worker=build_worker,
            build_token_jti=self.jti if jti is None else jti,
            worker_sign_key=self.registered.get(build_worker), now=clock.now)


@pytest.fixture
def running(clock, ring, worker_a, worker_b) -> Running:
    guard = BuildRequestGuard(issuer=ISSUER, proof_max_age_s=30,
                              started_at=clock.now - timedelta(seconds=1))
    token, claims = mint_build_token(ring, issuer=ISSUER, build_id=7, worker="a",
                                     jkt=worker_a.thumbprint, timeout_s=600, grace_s=60,
                                     now=clock.now)
    clock.advance(1)
    return Running(ring=ring, guard=guard, identity=worker_a, token=token, jti=claims.jti,
                   registered={"a": worker_a.sign_public_key, "b": worker_b.sign_public_key})


class FakeStore:
    """The handful of Store methods the security core uses, in memory."""

    def __init__(self) -> None:
        self.tokens: dict[str, RegistrationToken] = {}
        self.keys: dict[str, ServerKey] = {}
        self.workers: dict[str, Worker] = {}

    async def create_registration_token(self, *, token_hash, routes, hostname, expires_at):
        self.tokens[token_hash] = RegistrationToken(
            id=len(self.tokens) + 1, token_hash=token_hash, routes=list(routes),
            hostname=hostname, created_at=expires_at, expires_at=expires_at)
        return len(self.tokens)

    async def get_registration_token(self, token_hash):
        return self.tokens.get(token_hash)

    async def use_registration_token(self, token_hash, *, used_by, now):
        row = self.tokens.get(token_hash)
        if row is None or row.used_at is not None or row.expires_at <= now:
            return False
        row.used_at, row.used_by = now, used_by
        return True

    async def save_server_key(self, *, kid, purpose, private_enc, public_key, created_at):
        self.keys[kid] = ServerKey(kid=kid, purpose=purpose, private_enc=private_enc,
                                   public_key=public_key, created_at=created_at)

    async def list_server_keys(self, purpose):
        return sorted((k for k in self.keys.values() if k.purpose == purpose),
                      key=lambda k: k.created_at)

    async def retire_server_key(self, kid, *, retired_at, verify_until):
        self.keys[kid].retired_at = retired_at
        self.keys[kid].verify_until = verify_until

    async def find_worker(self, hostname):
        return self.workers.get(hostname)

    async def upsert_worker(self, hostname, *, routes, build_limit, sign_public_key,
                            seal_public_key, key_thumbprint, address="", ray_node_id=None,
                            actor_name=None, backlog=0):
        row = self.workers.get(hostname) or Worker(hostname=hostname, active=True)
        row.routes, row.build_limit, row.backlog = list(routes), build_limit, backlog
        row.sign_public_key, row.seal_public_key = sign_public_key, seal_public_key
        row.key_thumbprint, row.address = key_thumbprint, address
        self.workers[hostname] = row
        return row


@pytest.fixture
def fake_store() -> FakeStore:
    return FakeStore()
