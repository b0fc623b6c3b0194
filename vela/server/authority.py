"""The TokenAuthority's logic: the only holder of the server's token signing keys.

It mints a build token bound to one worker's key and seals the build's
package (secrets encrypted to that worker, the whole signed), verifies every
call made with a build token (the token, then the call's proof of possession over
its reports, through the one :class:`~vela.security.BuildRequestGuard`), and mints
registration tokens. The last check, against the build's row, is made where the
reports are written, in the same transaction
(:class:`~vela.server.reports.ReportWriter`). Revocation is the build row itself: a
token acts only while its build is ``running`` on its worker with its ``jti``
recorded, so ending, re-queueing or re-dispatching a build kills its token at once.
Its keys follow the database (:class:`~vela.security.keys.RingHolder`): after a
rotation it signs with the new key once that key's turn comes, and verifies the old
ones until they expire.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vela.coalesce import answer_each, check_batch
from vela.config import Settings
from vela.db.models import Build, Repo, Worker
from vela.db.store import Store
from vela.errors import NotFound
from vela.pipeline import Executable
from vela.security import (
    BuildClaims,
    BuildRequestGuard,
    KeyRing,
    Reason,
    Rejected,
    create_registration_token,
    mint_api_token,
    mint_build_token,
    publish_key_set,
    seal_package,
)
from vela.security.keys import PURPOSE_TOKEN, RingHolder
from vela.server.builds import build_meta

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class IssuedPackage:
    """A sealed package for one worker, and the token id to record on the build."""

    package: dict[str, Any] = field(repr=False)
    jti: str
    worker: str
    build_id: int


@dataclass
class AuthorityStats:
    issued: int = 0
    verified: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Authority:
    def __init__(self, store: Store, keys: RingHolder, *, settings: Settings,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.store = store
        self.keys = keys
        self.settings = settings
        self.server_id = settings.server.id
        self._clock = clock
        self.guard = BuildRequestGuard(issuer=self.server_id,
                                       proof_max_age_s=settings.tokens.proof_max_age_s,
                                       started_at=clock())
        self.stats = AuthorityStats()

    @classmethod
    async def load(cls, store: Store, settings: Settings, master_key: bytes, *,
                   clock: Callable[[], datetime] = _utcnow) -> Authority:
        keys = await RingHolder.open(store, purpose=PURPOSE_TOKEN, master_key=master_key,
                                     period_s=settings.tokens.key_reload_s, clock=clock)
        return cls(store, keys, settings=settings, clock=clock)

    @property
    def ring(self) -> KeyRing:
        """The token keys as last loaded (:meth:`RingHolder.current` reloads them)."""
        return self.keys.ring

    def __repr__(self) -> str:
        return f"Authority({self.server_id}, {self.keys!r})"

    async def key_set(self) -> dict[str, Any]:
        """The verifying keys, endorsed by each: what a worker pins at registration, and
        fetches again when a package names a key it has not pinned (a rotation)."""
        return publish_key_set(await self.keys.current(), server_id=self.server_id,
                               now=self._clock()).model_dump(mode="json")

    async def issue_package(self, build_id: int, hostname: str, *,
                            rows: tuple[Build, Repo, Worker] | None = None) -> IssuedPackage:
        """Mint a token for ``build_id`` bound to ``hostname``'s registered key and seal
        the package to it. Secrets are read here and leave only sealed. ``rows``: the
        build, repo and worker, read already (:meth:`issue_packages`)."""
        ring = await self.keys.current()
        now = self._clock()
        build, repo, worker = rows or await self.store.package_rows(build_id, hostname)
        executable = Executable.from_json(build.executable)
        secrets = await self.store.secrets_for_repo(repo.full_name, executable.secret_names())
        token, claims = mint_build_token(
            ring, issuer=self.server_id, build_id=build.id, worker=hostname,
            jkt=worker.key_thumbprint, timeout_s=build.timeout_s,
            grace_s=self.settings.tokens.build_token_grace_s, now=now)
        meta = build_meta(build, repo.full_name)
        package = seal_package(ring=ring, server_id=self.server_id, build_id=build.id,
                               worker=hostname, worker_seal_key=worker.seal_public_key,
                               build=meta, executable=build.executable, secrets=secrets,
                               build_token=token, now=now,
                               ttl_s=self.settings.tokens.package_ttl_s)
        self.stats.issued += 1
        return IssuedPackage(package=package.to_wire(), jti=claims.jti, worker=hostname,
                             build_id=build.id)

    async def issue_packages(self, requests: Sequence[object]
                             ) -> list[IssuedPackage | Exception]:
        """:meth:`issue_package` for each ``(build_id, hostname)``, answered in order;
        one that fails gets its error and the others go on. Their rows are read in one
        query first."""
        valid = []
        for request in check_batch(requests):  # refused whole before any read
            with contextlib.suppress(Rejected):  # answered below, on its own
                valid.append(_pair(request))
        rows = await self.store.package_rows_many(valid)

        async def one(request: object) -> IssuedPackage:
            pair = _pair(request)
            return await self.issue_package(*pair, rows=rows.get(pair))

        return await answer_each(requests, one)

    async def verify_many(self, requests: Sequence[object]
                          ) -> list[BuildClaims | Exception]:
        """:meth:`verify` for each ``{"build_id", "token", "proof", "reports_digest",
        "worker_sign_key"}`` (the report calls of several builds), answered in order,
        each on its own."""
        return await answer_each(requests, lambda r: self.verify(**_report_request(r)))

    async def verify(self, *, build_id: int, token: object, proof: object,
                     reports_digest: str, worker_sign_key: str | None = None) -> BuildClaims:
        """Check a worker's call on ``build_id``: ``token``, then ``proof`` over the
        call's reports (which hash to ``reports_digest``, as the Scheduler received
        them) against ``worker_sign_key`` — the registered key of the worker the build
        runs on, as the Scheduler knows it; read from the database when None.
        Returns the token's claims, for the writer to check each report against the
        build's row (:func:`~vela.security.authorize_all`); :class:`Rejected` with the
        reason code of the first check that fails.
        """
        now = self._clock()
        try:
            if not isinstance(build_id, int) or isinstance(build_id, bool):
                raise Rejected(Reason.MALFORMED, "build id")
            if worker_sign_key is None:
                worker_sign_key = await self._key_of_builds_worker(build_id)
            keys = await self.keys.verifying_keys()
            try:
                claims = self.guard.verify(
                    token=token, proof=proof, reports_digest=reports_digest, keys=keys,
                    build_id=build_id, worker_sign_key=worker_sign_key, now=now)
            except Rejected as e:
                # Checked before the proof, which is therefore not spent yet.
                if e.reason is not Reason.UNKNOWN_KID or not await self.keys.reload_unknown():
                    raise
                claims = self.guard.verify(
                    token=token, proof=proof, reports_digest=reports_digest,
                    keys=await self.keys.verifying_keys(), build_id=build_id,
                    worker_sign_key=worker_sign_key, now=now)
        except Rejected as e:
            self.stats.rejected[e.reason.value] = self.stats.rejected.get(e.reason.value, 0) + 1
            raise
        self.stats.verified += 1
        return claims

    async def _key_of_builds_worker(self, build_id: int) -> str | None:
        try:
            return (await self.store.build_and_worker_key(build_id))[1]
        except NotFound:
            raise Rejected(Reason.WRONG_BUILD, f"no build {build_id}") from None

    async def registration_token(self, *, routes: list[str], hostname: str | None,
                                 ttl_s: int | None = None) -> str:
        return await create_registration_token(
            self.store, routes=routes, hostname=hostname,
            ttl_s=ttl_s or self.settings.tokens.registration_ttl_s, now=self._clock())

    async def mint_api_token(self, *, subject: str, scopes: list[str],
                             ttl_s: int) -> dict[str, Any]:
        """An API token for people and tools; the HTTP API checks it against
        :meth:`key_set`'s keys (a build token never passes: other ``typ`` and ``aud``)."""
        token, claims = mint_api_token(await self.keys.current(), issuer=self.server_id,
                                       subject=subject, scopes=scopes, ttl_s=ttl_s,
                                       now=self._clock())
        return {"token": token, "subject": claims.sub, "scopes": claims.scp,
                "expires_at": claims.exp}


def _pair(request: object) -> tuple[int, str]:
    if not (isinstance(request, list | tuple) and len(request) == 2
            and isinstance(request[0], int) and not isinstance(request[0], bool)
            and isinstance(request[1], str)):
        raise Rejected(Reason.MALFORMED, "a request is (build_id, hostname)")
    return request[0], request[1]


def _report_request(request: object) -> dict[str, Any]:
    fields = {"build_id", "token", "proof", "reports_digest"}
    if not isinstance(request, dict) or not (
            fields <= set(request) <= fields | {"worker_sign_key"}):
        raise Rejected(Reason.MALFORMED, "a request is build_id, token, proof, "
                       "reports_digest and the worker's key")
    key = request.get("worker_sign_key")
    if (key is not None and not isinstance(key, str)) or not isinstance(
            request["reports_digest"], str):
        raise Rejected(Reason.MALFORMED, "the worker's key or the reports' digest")
    return request
