"""The one store layer over both back ends.

State changes are compare-and-set UPDATEs (``... WHERE status = :expected``):
of two concurrent writers exactly one moves a build, the other gets
:class:`~vela.errors.Conflict`. Returned rows are detached model instances.
Each method is one unit of work run whole by :class:`~vela.db.engine.Database`
(on SQLite in the process's database thread, on PostgreSQL through asyncpg).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Table, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, make_transient_to_detached

from vela.coalesce import Coalescer, call_counts
from vela.db.engine import database, rowcount, shaped
from vela.db.models import (
    ApiCredential,
    ApiTokenRevocation,
    Build,
    Log,
    RegistrationToken,
    Repo,
    Secret,
    ServerKey,
    Step,
    Worker,
)
from vela.domain import (
    DEFAULT_ROUTE,
    STEP_TRANSITIONS,
    BuildStatus,
    StepStatus,
    WorkerStatus,
    check_build_transition,
    check_repo_allowlist,
    check_step_transition,
    split_repo,
)
from vela.errors import Conflict, NotFound, VelaError
from vela.pipeline import shared_secret_key
from vela.security import atrest

log = logging.getLogger(__name__)
T = TypeVar("T")

SECRET_SCOPES = ("repo", "org", "shared")
# For each step status, the statuses a step may move to it from.
_STEP_FROM = {new: [old.value for old, nexts in STEP_TRANSITIONS.items() if new in nexts]
              for new in StepStatus}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SecretInfo:
    """A secret's metadata. Values are write-only: no listing ever returns one."""

    id: int
    scope: str
    org: str
    target: str
    name: str
    created_at: datetime
    updated_at: datetime
    repo_allowlist: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepSpec:
    number: int
    name: str
    image: str = ""


class Store:
    def __init__(self, engine: AsyncEngine, master_key: bytes) -> None:
        self.engine = engine
        self._master_key = master_key
        self._db = database(engine)
        self._dialect = engine.dialect.name
        self._shared: Coalescer[Callable[[Session], Any], Any] = Coalescer(self._write_batch)

    def __repr__(self) -> str:
        return f"Store({self.engine.dialect.name})"

    async def close(self) -> None:
        await self.engine.dispose()

    # ------------------------------------------------------------------ repos
    async def get_or_create_repo(self, full_name: str, *, timeout_s: int = 3600) -> Repo:
        org, name = split_repo(full_name)

        def unit(s: Session) -> Repo:
            repo = s.scalar(select(Repo).where(Repo.full_name == full_name))
            if repo is not None:
                return repo
            repo = Repo(org=org, name=name, full_name=full_name, timeout_s=timeout_s,
                        counter=0, active=True, created_at=utcnow())
            s.add(repo)
            try:
                s.commit()
            except IntegrityError:  # created concurrently
                s.rollback()
                repo = s.scalar(select(Repo).where(Repo.full_name == full_name))
                assert repo is not None
            return repo

        return await self._db.read(unit)

    async def get_repo(self, full_name: str) -> Repo:
        repo = await self._db.read(
            lambda s: s.scalar(select(Repo).where(Repo.full_name == full_name)))
        if repo is None:
            raise NotFound(f"repository {full_name} not found")
        return repo

    async def list_repos(self) -> list[Repo]:
        return await self._db.read(
            lambda s: list(s.scalars(select(Repo).order_by(Repo.full_name))))

    # ----------------------------------------------------------------- builds
    async def create_build(self, repo_full_name: str, *, executable: str,
                           steps: Sequence[StepSpec], route: str = DEFAULT_ROUTE,
                           timeout_s: int | None = None,
                           parent_id: int | None = None,
                           enqueued_at: datetime | None = None,
                           then: Callable[[Session, Build], object] | None = None) -> Build:
        """A new ``pending`` build with its steps; the repo's counter gives the number.
        One transaction (shared, as :meth:`write_shared`), the repo's row read and
        counted in one statement (a first build of a repo creates the repo first);
        ``then`` runs last in it (to queue the build in the same transaction)."""
        split_repo(repo_full_name)
        now = utcnow()

        def unit(s: Session) -> Build | None:
            repo = s.execute(shaped(("count_build",), lambda: (
                update(_REPOS).where(_REPOS.c.full_name == bindparam("_name"))
                .values(counter=_REPOS.c.counter + 1)
                .returning(_REPOS.c.id, _REPOS.c.counter, _REPOS.c.timeout_s))),
                {"_name": repo_full_name}).first()
            if repo is None:
                return None
            build = _detached(Build, s.execute(
                shaped(("new_build",), lambda: insert(_BUILDS).returning(*_BUILDS.c)),
                {"repo_id": repo.id, "number": repo.counter, "route": route,
                 "status": BuildStatus.PENDING.value,
                 "timeout_s": timeout_s or repo.timeout_s, "attempts": 0,
                 "executable": executable, "parent_id": parent_id, "created_at": now,
                 "enqueued_at": enqueued_at}).one())
            if steps:
                s.execute(insert(_STEPS), [
                    {"build_id": build.id, "number": spec.number, "name": spec.name,
                     "image": spec.image, "status": StepStatus.PENDING.value}
                    for spec in steps])
            if then is not None:
                then(s, build)
            return build

        build = await self._shared.call(unit)
        if build is None:
            await self.get_or_create_repo(repo_full_name)
            build = await self._shared.call(unit)
            assert build is not None
        return build

    async def get_build(self, build_id: int) -> Build:
        build = await self._db.read(lambda s: s.get(Build, build_id))
        if build is None:
            raise NotFound(f"build {build_id} not found")
        return build

    async def get_builds(self, build_ids: Iterable[int]) -> dict[int, Build]:
        """The builds of ``build_ids`` that exist, by id, in one query."""
        wanted = sorted(set(build_ids))
        if not wanted:
            return {}
        return await self._db.read(lambda s: {b.id: b for b in s.scalars(
            select(Build).where(Build.id.in_(wanted)))})

    async def get_build_by_number(self, repo_full_name: str, number: int) -> Build:
        build = await self._db.read(lambda s: s.scalar(
            select(Build).join(Repo, Repo.id == Build.repo_id)
            .where(Repo.full_name == repo_full_name, Build.number == number)))
        if build is None:
            raise NotFound(f"build {repo_full_name}#{number} not found")
        return build

    async def build_and_worker_key(self, build_id: int) -> tuple[Build, str | None]:
        """A build and the signing key of the worker it names (None if none), in one
        query: what checking a request made with a build token needs."""
        stmt = shaped(("build_and_worker_key",), lambda: select(Build, Worker.sign_public_key)
                      .outerjoin(Worker, Worker.hostname == Build.worker)
                      .where(Build.id == bindparam("_id")))
        row = await self._db.read(lambda s: s.execute(stmt, {"_id": build_id}).first())
        if row is None:
            raise NotFound(f"build {build_id} not found")
        return row[0], row[1]

    async def package_rows(self, build_id: int, hostname: str) -> tuple[Build, Repo, Worker]:
        """A build, its repo and the worker ``hostname``, in one query: what sealing a
        package for that worker needs."""
        stmt = shaped(("package_rows",), lambda: select(Build, Repo, Worker)
                      .join(Repo, Repo.id == Build.repo_id)
                      .join(Worker, Worker.hostname == bindparam("_hostname"))
                      .where(Build.id == bindparam("_id")))
        row = await self._db.read(
            lambda s: s.execute(stmt, {"_id": build_id, "_hostname": hostname}).first())
        if row is None:
            await self.get_build(build_id)  # NotFound for whichever is missing
            await self.get_worker(hostname)
            raise NotFound(f"build {build_id} or worker {hostname} not found")
        return row[0], row[1], row[2]

    async def package_rows_many(self, pairs: Sequence[tuple[int, str]]
                                ) -> dict[tuple[int, str], tuple[Build, Repo, Worker]]:
        """:meth:`package_rows` for several ``(build_id, hostname)`` pairs in one query;
        a pair whose build or worker does not exist is left out."""
        if not pairs:
            return {}
        ids, hosts = {b for b, _ in pairs}, {h for _, h in pairs}
        rows = await self._db.read(lambda s: s.execute(
            select(Build, Repo, Worker).join(Repo, Repo.id == Build.repo_id)
            .join(Worker, Worker.hostname.in_(hosts)).where(Build.id.in_(ids))).all())
        wanted = set(pairs)
        return {(b.id, w.hostname): (b, r, w) for b, r, w in rows
                if (b.id, w.hostname) in wanted}

    async def repo_of(self, build: Build) -> Repo:
        repo = await self._db.read(lambda s: s.get(Repo, build.repo_id))
        assert repo is not None
        return repo

    async def list_builds(self, *, repo: str | None = None,
                          status: Iterable[BuildStatus] | None = None,
                          worker: str | None = None, unqueued: bool = False,
                          limit: int = 50, offset: int = 0) -> list[Build]:
        """Newest first; ``unqueued``: only builds whose queue push has not happened."""
        q = select(Build).order_by(Build.id.desc()).limit(limit).offset(offset)
        if unqueued:
            q = q.where(Build.enqueued_at.is_(None))
        if repo is not None:
            q = q.join(Repo, Repo.id == Build.repo_id).where(Repo.full_name == repo)
        if status is not None:
            q = q.where(Build.status.in_([BuildStatus(x).value for x in status]))
        if worker is not None:
            q = q.where(Build.worker == worker)
        return await self._db.read(lambda s: list(s.scalars(q)))

    async def count_builds(self, status: BuildStatus) -> int:
        return await self._db.read(lambda s: int(s.scalar(
            select(func.count()).select_from(Build).where(Build.status == status.value)
        ) or 0))

    async def set_build_fields(self, build_id: int, **fields: Any) -> None:
        """Bookkeeping fields that are not part of the state machine (e.g. enqueued_at)."""
        await self.write(lambda w: w.set_build_fields(build_id, **fields))

    async def transition_build(self, build_id: int, expected: BuildStatus,
                               new: BuildStatus, *, only_if: dict[str, Any] | None = None,
                               shared: bool = False, **fields: Any) -> Build:
        """Compare-and-set a build's status; raises :class:`Conflict` if it lost.

        ``only_if`` adds equality guards (e.g. ``{"token_jti": jti}``) to the CAS;
        ``shared`` writes it with :meth:`write_shared`.
        """
        write = self.write_shared if shared else self.write
        return await write(
            lambda w: w.transition_build(build_id, expected, new, only_if=only_if, **fields))

    async def write(self, unit: Callable[[Writes], T]) -> T:
        """Several build, step and log writes in one transaction: all of them or, if
        ``unit`` raises, none."""
        return await self._db.write(lambda s: unit(Writes(s, self._dialect)))

    async def write_shared(self, unit: Callable[[Writes], T]) -> T:
        """:meth:`write`, in a transaction shared with the other shared writes made at
        the same moment (one commit and one hand-off for all: a busy Scheduler's
        dispatches and reports). Its result and its failure are its own: if any unit
        of a shared transaction raises, none of it is kept and each unit runs again
        in a transaction of its own — so a unit must be a plain function of the
        :class:`Writes`, safe to run twice. A failed commit is every unit's failure:
        it may have landed, so nothing runs again."""
        return await self._shared.call(lambda s: unit(Writes(s, self._dialect)))

    def call_counts(self) -> dict[str, dict[str, int]]:
        """Shared transactions made and the writes they carried."""
        return call_counts(write_shared=self._shared)

    async def _write_batch(self, units: list[Callable[[Session], Any]]) -> list[Any]:
        if len(units) > 1:
            flushed: list[bool] = []

            def batch(s: Session) -> list[Any]:
                out = [unit(s) for unit in units]
                s.flush()
                flushed.append(True)  # every write was accepted: only the commit is left
                return out

            try:
                return await self._db.write(batch)
            except Exception as e:  # noqa: BLE001 - whose it is, each unit's own run tells
                if flushed:
                    # The commit failed, and may have landed all the same (its answer
                    # lost): no unit runs again, each caller learns it failed.
                    log.warning("a shared transaction's commit failed (%s)",
                                type(e).__name__)
                    return [e] * len(units)
                log.debug("a shared write failed (%s); its units run one by one",
                          type(e).__name__)
        out: list[Any] = []
        for unit in units:
            try:
                out.append(await self._db.write(unit))
            except Exception as e:  # noqa: BLE001 - the answer of that unit's caller
                out.append(e)
        return out

    # ------------------------------------------------------------------ steps
    async def get_steps(self, build_id: int) -> list[Step]:
        return await self._db.read(lambda s: list(s.scalars(
            select(Step).where(Step.build_id == build_id).order_by(Step.number))))

    async def update_step(self, build_id: int, number: int, status: StepStatus, *,
                          exit_code: int | None = None, reason: str | None = None,
                          at: datetime | None = None) -> Step:
        """Move a step to ``status``: one compare-and-set from any status that may precede
        it; raises :class:`NotFound`, :class:`InvalidTransition` or :class:`Conflict`."""
        return await self.write(lambda w: w.update_step(
            build_id, number, status, exit_code=exit_code, reason=reason, at=at))

    # ------------------------------------------------------------------- logs
    async def append_log(self, build_id: int, number: int, lines: Sequence[str], *,
                         seq: int | None = None) -> int:
        """Append one chunk to a step's log; returns its sequence number.

        With ``seq`` (the sender's chunk number) the append is idempotent: a chunk
        already stored under that number is not stored again.
        """
        return await self.write(lambda w: w.append_log(build_id, number, lines, seq=seq))

    async def get_logs(self, build_id: int, *, number: int | None = None,
                       after_id: int = 0) -> list[tuple[int, int, str]]:
        """Log chunks as ``(chunk id, step number, text)`` in order."""
        q = (select(Log.id, Step.number, Log.data).join(Step, Step.id == Log.step_id)
             .where(Log.build_id == build_id, Log.id > after_id)
             .order_by(Step.number, Log.seq))
        if number is not None:
            q = q.where(Step.number == number)
        return await self._db.read(lambda s: [(r[0], r[1], r[2]) for r in s.execute(q)])

    # ---------------------------------------------------------------- secrets
    @staticmethod
    def _secret_aad(scope: str, org: str, target: str, name: str) -> bytes:
        return f"vela-secret\x00{scope}\x00{org}\x00{target}\x00{name}".encode()

    async def put_secret(self, scope: str, org: str, target: str, name: str,
                         value: str | None, *, exists: bool | None = None,
                         repo_allowlist: Iterable[str] | None = None) -> SecretInfo:
        """Create or update a secret; the value is stored AES-GCM encrypted. With
        ``exists`` False only create it (:class:`Conflict` if it exists), True only
        update it (:class:`NotFound` if it does not), checked in the write itself.
        An update leaves the value (``value`` None) or the allowlist (None) as they are;
        a new secret has no allowlist unless given one (:func:`check_repo_allowlist`)."""
        if scope not in SECRET_SCOPES:
            raise VelaError(f"secret scope must be one of {', '.join(SECRET_SCOPES)}")
        if scope == "org":
            target = "*"
        allowed = (None if repo_allowlist is None
                   else check_repo_allowlist(scope, org, repo_allowlist))
        if value is None and exists is not True:
            raise VelaError(f"secret {name} needs a value")
        blob = None if value is None else atrest.encrypt(
            self._master_key, value.encode(), self._secret_aad(scope, org, target, name))
        now = utcnow()

        def unit(s: Session) -> SecretInfo:
            row = s.scalar(select(Secret).where(
                Secret.scope == scope, Secret.org == org, Secret.target == target,
                Secret.name == name))
            if exists is not None and exists != (row is not None):
                raise (Conflict if row is not None else NotFound)(f"secret {name}")
            if row is None:
                row = Secret(scope=scope, org=org, target=target, name=name, value_enc=blob,
                             repo_allowlist=allowed or [], created_at=now, updated_at=now)
                s.add(row)
            else:
                if blob is not None:
                    row.value_enc = blob
                if allowed is not None:
                    row.repo_allowlist = allowed
                row.updated_at = now
            s.flush()
            return _secret_info(row)

        try:
            return await self._db.write(unit)
        except IntegrityError:  # created by another request meanwhile
            if exists is False:
                raise Conflict(f"secret {name}") from None
            return await self._db.write(unit)  # an update now

    async def list_secrets(self, *, org: str | None = None) -> list[SecretInfo]:
        q = select(Secret).order_by(Secret.org, Secret.scope, Secret.target, Secret.name)
        if org is not None:
            q = q.where(Secret.org == org)
        return await self._db.read(lambda s: [_secret_info(r) for r in s.scalars(q)])

    async def delete_secret(self, scope: str, org: str, target: str, name: str) -> None:
        if scope == "org":
            target = "*"
        deleted = await self._db.write(lambda s: rowcount(s.execute(delete(Secret).where(
            Secret.scope == scope, Secret.org == org, Secret.target == target,
            Secret.name == name))))
        if deleted != 1:
            raise NotFound(f"secret {scope}/{org}/{target}/{name} not found")

    async def secrets_for_repo(self, full_name: str, refs: Iterable[str]) -> dict[str, str]:
        """Clear values of the secrets a build of ``full_name`` may use, of those its
        pipeline names (:meth:`~vela.pipeline.Executable.secret_names`), by that name.

        A name is a repo secret's, else the org's (the repo's wins). A key
        ``org/team/name`` is a shared secret's, given only to repos of its own org that
        its allowlist names. What may not be used is left out, as what does not exist.
        Only the server's scheduler calls this, to seal a package to one worker.
        """
        org, repo = split_repo(full_name)
        names: set[str] = set()
        shared: set[tuple[str, str]] = set()  # (team, name)
        for ref in refs:
            key = shared_secret_key(ref)
            if key is None:
                names.add(ref)
            elif key[0] == org:  # another org's: never
                shared.add(key[1:])
        if not names and not shared:
            return {}
        named = Secret.name.in_(names) & (
            ((Secret.scope == "repo") & (Secret.target == repo)) | (Secret.scope == "org"))
        teams = ((Secret.scope == "shared") & Secret.target.in_({t for t, _ in shared})
                 & Secret.name.in_({n for _, n in shared}))
        rows = await self._db.read(lambda s: list(s.scalars(select(Secret).where(
            Secret.org == org, or_(named, teams)))))
        rows = [r for r in rows if r.scope != "shared"
                or ((r.target, r.name) in shared and full_name in r.repo_allowlist)]
        rows.sort(key=lambda r: r.scope == "repo")  # repo scope last, so it wins
        return {_secret_ref(r): atrest.decrypt(self._master_key, r.value_enc,
                                               self._secret_aad(r.scope, r.org, r.target,
                                                                r.name)).decode()
                for r in rows}

    # ---------------------------------------------------------------- workers
    async def upsert_worker(self, hostname: str, *, routes: Sequence[str], build_limit: int,
                            sign_public_key: str, seal_public_key: str, key_thumbprint: str,
                            address: str = "", ray_node_id: str | None = None,
                            actor_name: str | None = None, backlog: int = 0) -> Worker:
        now = utcnow()
        fields = dict(routes=list(routes), build_limit=build_limit, backlog=backlog,
                      sign_public_key=sign_public_key, seal_public_key=seal_public_key,
                      key_thumbprint=key_thumbprint, address=address,
                      ray_node_id=ray_node_id, actor_name=actor_name,
                      last_checked_in=now, last_status_update=now)

        def unit(s: Session) -> Worker:
            row = s.scalar(select(Worker).where(Worker.hostname == hostname))
            if row is None:
                row = Worker(hostname=hostname, active=True, status=WorkerStatus.IDLE.value,
                             running_builds=[], registered_at=now, **fields)
                s.add(row)
            else:
                for k, v in fields.items():
                    setattr(row, k, v)
            s.flush()
            return row

        return await self._db.write(unit)

    async def get_worker(self, hostname: str) -> Worker:
        row = await self.find_worker(hostname)
        if row is None:
            raise NotFound(f"worker {hostname} is not registered")
        return row

    async def find_worker(self, hostname: str) -> Worker | None:
        return await self._db.read(
            lambda s: s.scalar(select(Worker).where(Worker.hostname == hostname)))

    async def list_workers(self) -> list[Worker]:
        return await self._db.read(
            lambda s: list(s.scalars(select(Worker).order_by(Worker.hostname))))

    async def update_worker(self, hostname: str, **fields: Any) -> None:
        if "status" in fields:
            fields["status"] = WorkerStatus(fields["status"]).value
            fields.setdefault("last_status_update", utcnow())
        updated = await self._db.write(lambda s: rowcount(s.execute(
            update(Worker).where(Worker.hostname == hostname).values(**fields))))
        if updated != 1:
            raise NotFound(f"worker {hostname} is not registered")

    # ---------------------------------------------------- registration tokens
    async def create_registration_token(self, *, token_hash: str, routes: list[str],
                                        hostname: str | None, expires_at: datetime) -> int:
        def unit(s: Session) -> int:
            row = RegistrationToken(token_hash=token_hash, routes=list(routes),
                                    hostname=hostname, created_at=utcnow(),
                                    expires_at=expires_at)
            s.add(row)
            s.flush()
            return row.id

        return await self._db.write(unit)

    async def get_registration_token(self, token_hash: str) -> RegistrationToken | None:
        return await self._db.read(lambda s: s.scalar(
            select(RegistrationToken).where(RegistrationToken.token_hash == token_hash)))

    async def use_registration_token(self, token_hash: str, *, used_by: str,
                                     now: datetime) -> bool:
        """Compare-and-set: marks the token used only if unused and unexpired."""
        return await self._db.write(lambda s: rowcount(s.execute(
            update(RegistrationToken)
            .where(RegistrationToken.token_hash == token_hash,
                   RegistrationToken.used_at.is_(None),
                   RegistrationToken.expires_at > now)
            .values(used_at=now, used_by=used_by)))) == 1

    # -------------------------------------------------------- api credentials
    async def add_api_credential(self, *, name: str, secret_hash: str,
                                 scopes: Sequence[str]) -> bool:
        """Store a credential's hash; False if ``name`` exists already (first one wins)."""
        try:
            await self._db.write(lambda s: s.add(ApiCredential(
                name=name, secret_hash=secret_hash, scopes=list(scopes),
                created_at=utcnow())))
        except IntegrityError:
            return False
        return True

    async def put_api_credential(self, *, name: str, secret_hash: str,
                                 scopes: Sequence[str]) -> None:
        """Store a credential's hash under ``name``, replacing the one there."""
        def unit(s: Session) -> None:
            row = s.scalar(select(ApiCredential).where(ApiCredential.name == name))
            if row is None:
                s.add(ApiCredential(name=name, secret_hash=secret_hash, scopes=list(scopes),
                                    created_at=utcnow()))
            else:
                row.secret_hash, row.scopes = secret_hash, list(scopes)
                row.created_at, row.last_used_at = utcnow(), None

        await self._db.write(unit)

    async def revoke_api_tokens(self, subject: str, *, before: datetime,
                                until: datetime) -> None:
        """Refuse every API token of ``subject`` issued before ``before``; the entry can
        go after ``until``, when no such token is valid any more (expired ones go now)."""
        def unit(s: Session) -> None:
            s.execute(delete(ApiTokenRevocation).where(ApiTokenRevocation.expires_at <= utcnow()))
            row = s.scalar(select(ApiTokenRevocation).where(
                ApiTokenRevocation.subject == subject))
            if row is None:
                s.add(ApiTokenRevocation(subject=subject, revoked_before=before,
                                         expires_at=until))
            else:
                row.revoked_before, row.expires_at = before, max(until, row.expires_at)

        await self._db.write(unit)

    async def api_token_revocations(self) -> dict[str, datetime]:
        """Subject -> the instant before which its API tokens are refused (live entries)."""
        return await self._db.read(lambda s: {
            r.subject: r.revoked_before for r in s.scalars(select(ApiTokenRevocation).where(
                ApiTokenRevocation.expires_at > utcnow()))})

    async def find_api_credential(self, secret_hash: str) -> ApiCredential | None:
        return await self._db.read(lambda s: s.scalar(
            select(ApiCredential).where(ApiCredential.secret_hash == secret_hash)))

    async def touch_api_credential(self, credential_id: int) -> None:
        await self._db.write(lambda s: s.execute(
            update(ApiCredential).where(ApiCredential.id == credential_id)
            .values(last_used_at=utcnow())))

    # ------------------------------------------------------------ server keys
    async def save_server_key(self, *, kid: str, purpose: str, private_enc: bytes,
                              public_key: str, created_at: datetime) -> None:
        await self._db.write(lambda s: s.add(ServerKey(
            kid=kid, purpose=purpose, private_enc=private_enc, public_key=public_key,
            created_at=created_at)))

    async def list_server_keys(self, purpose: str) -> list[ServerKey]:
        return await self._db.read(lambda s: list(s.scalars(
            select(ServerKey).where(ServerKey.purpose == purpose)
            .order_by(ServerKey.created_at))))

    async def retire_server_key(self, kid: str, *, retired_at: datetime,
                                verify_until: datetime) -> None:
        await self._db.write(lambda s: s.execute(
            update(ServerKey).where(ServerKey.kid == kid)
            .values(retired_at=retired_at, verify_until=verify_until)))


class Writes:
    """The build, step and log writes of :meth:`Store.write`, in its one transaction;
    each statement built once per shape (:func:`~vela.db.engine.shaped`)."""

    def __init__(self, session: Session, dialect: str) -> None:
        self._s = session
        self._dialect = dialect

    # Core statements on the tables, not ORM-enabled ones: the ORM's bulk-update path
    # (synchronising the session, loading RETURNING rows into objects) cost more CPU
    # than the statements themselves.

    def set_build_fields(self, build_id: int, **fields: Any) -> None:
        assert "status" not in fields, "use transition_build for status changes"
        stmt = shaped(("set_build", *sorted(fields)), lambda: update(_BUILDS).where(
            _BUILDS.c.id == bindparam("_id")).values({k: bindparam(k) for k in fields}))
        self._s.execute(stmt, {"_id": build_id, **fields})

    def transition_build(self, build_id: int, expected: BuildStatus,
                         new: BuildStatus, *, only_if: dict[str, Any] | None = None,
                         **fields: Any) -> Build:
        check_build_transition(expected, new)
        guards = only_if or {}
        assert None not in guards.values(), "a guard compares with =, never IS NULL"
        values = {"status": new.value, **fields}
        now = utcnow()
        if new.terminal:
            values.setdefault("finished_at", now)
        stmt = shaped(("transition", *sorted(guards), "|", *sorted(values)), lambda: (
            update(_BUILDS)
            .where(_BUILDS.c.id == bindparam("_id"),
                   _BUILDS.c.status == bindparam("_expected"),
                   *[_BUILDS.c[c] == bindparam(f"_if_{c}") for c in guards])
            .values({k: bindparam(k) for k in values}).returning(*_BUILDS.c)))
        s = self._s
        row = s.execute(stmt, {"_id": build_id, "_expected": expected.value, **values,
                               **{f"_if_{c}": v for c, v in guards.items()}}).first()
        if row is None:
            current = s.scalar(select(Build.status).where(Build.id == build_id))
            if current is None:
                raise NotFound(f"build {build_id} not found")
            raise Conflict(f"build {build_id} is {current}, not {expected.value}; "
                           f"it cannot move to {new.value}")
        if new.terminal:  # steps not run are skipped, a running one ends with the build
            s.execute(shaped(("end_steps", new), lambda: _end_steps(new)),
                      {"_build_id": build_id, "_now": now})
        return _detached(Build, row)

    def token_row(self, build_id: int) -> Any:
        """What decides whether a build token may act on the build: its ``status``,
        ``worker`` and ``token_jti`` (None if no such build), locked for this
        transaction where the database can (PostgreSQL: ``FOR UPDATE``)."""
        stmt = shaped(("token_row",), lambda: select(
            _BUILDS.c.status, _BUILDS.c.worker, _BUILDS.c.token_jti)
            .where(_BUILDS.c.id == bindparam("_id")).with_for_update())
        return self._s.execute(stmt, {"_id": build_id}).first()

    def step_status(self, build_id: int, number: int) -> str | None:
        return self._s.scalar(
            select(Step.status).where(Step.build_id == build_id, Step.number == number))

    def update_step(self, build_id: int, number: int, status: StepStatus, *,
                    exit_code: int | None = None, reason: str | None = None,
                    at: datetime | None = None) -> Step:
        at = at or utcnow()
        values: dict[str, Any] = {"status": status.value}
        if status == StepStatus.RUNNING:
            values["started_at"] = at
        if status.terminal:
            values.update(exit_code=exit_code, reason=reason, finished_at=at)
        stmt = shaped(("update_step", status), lambda: (
            update(_STEPS)
            .where(_STEPS.c.build_id == bindparam("_build_id"),
                   _STEPS.c.number == bindparam("_number"),
                   _STEPS.c.status.in_(_STEP_FROM[status]))
            .values({k: bindparam(k) for k in values}).returning(*_STEPS.c)))
        row = self._s.execute(stmt, {"_build_id": build_id, "_number": number,
                                     **values}).first()
        if row is None:
            old = self.step_status(build_id, number)
            if old is None:
                raise NotFound(f"build {build_id} has no step {number}")
            check_step_transition(StepStatus(old), status)
            raise Conflict(f"step {number} of build {build_id} changed concurrently")
        return _detached(Step, row)

    def append_log(self, build_id: int, number: int, lines: Sequence[str], *,
                   seq: int | None = None) -> int:
        s = self._s
        step_id = s.scalar(shaped(("step_id",), lambda: select(Step.id).where(
            Step.build_id == bindparam("_build_id"), Step.number == bindparam("_number"))),
            {"_build_id": build_id, "_number": number})
        if step_id is None:
            raise NotFound(f"build {build_id} has no step {number}")
        row = {"build_id": build_id, "step_id": step_id,
               "data": "".join(line + "\n" for line in lines), "created_at": utcnow()}
        if seq is None:  # unnumbered (legacy workers): the next number
            seq = int(s.scalar(
                select(func.coalesce(func.max(Log.seq), 0)).where(Log.step_id == step_id)
            ) or 0) + 1
            s.execute(insert(Log).values(seq=seq, **row))
        else:  # a retried chunk that got through before stays stored once
            dialect_insert = pg_insert if self._dialect == "postgresql" else sqlite_insert
            s.execute(shaped(("log_once", self._dialect), lambda: dialect_insert(Log).values(
                {k: bindparam(k) for k in ("seq", *row)}).on_conflict_do_nothing()),
                {"seq": seq, **row})
        return seq


def _end_steps(build: BuildStatus) -> Any:
    """What ending a build does to its steps: those not run are skipped, a running one
    ends as :func:`_step_status_for` says."""
    pending, running = StepStatus.PENDING.value, StepStatus.RUNNING.value
    c = _STEPS.c
    return (update(_STEPS)
            .where(c.build_id == bindparam("_build_id"), c.status.in_([pending, running]))
            .values(status=case((c.status == pending, StepStatus.SKIPPED.value),
                                else_=_step_status_for(build).value),
                    finished_at=case((c.status == running, bindparam("_now")),
                                     else_=c.finished_at)))


_REPOS = cast(Table, Repo.__table__)
_BUILDS = cast(Table, Build.__table__)
_STEPS = cast(Table, Step.__table__)
M = TypeVar("M", Build, Step)


def _detached(model: type[M], row: Any) -> M:
    """A row of ``model``'s table as the detached object a session would have given."""
    obj = model(**row._mapping)
    make_transient_to_detached(obj)
    return obj


def _secret_info(row: Secret) -> SecretInfo:
    return SecretInfo(id=row.id, scope=row.scope, org=row.org, target=row.target,
                      name=row.name, created_at=row.created_at, updated_at=row.updated_at,
                      repo_allowlist=tuple(row.repo_allowlist or ()))


def _secret_ref(row: Secret) -> str:
    """What a pipeline knows the secret by: its name, or a shared secret's key."""
    return f"{row.org}/{row.target}/{row.name}" if row.scope == "shared" else row.name


def _step_status_for(build: BuildStatus) -> StepStatus:
    """What a still-running step becomes when its build ends from outside."""
    return {
        BuildStatus.CANCELED: StepStatus.CANCELED,
        BuildStatus.KILLED: StepStatus.KILLED,
        BuildStatus.SUCCESS: StepStatus.SUCCESS,
        BuildStatus.FAILURE: StepStatus.FAILURE,
    }.get(build, StepStatus.ERROR)
