"""What the HTTP API asks of the server, answered once, in plain code.

:class:`ServerBackend` does the work over the Store, the Scheduler core and a
token issuer (the Authority). In production it lives inside the Scheduler
actor and the API actor reaches it through
:class:`RemoteBackend` (one actor call per operation, see ``actors/api.py``);
in tests the same forwarding reaches it in another thread's event loop.
Every operation takes keyword arguments and returns plain JSON-able data,
so it crosses a process boundary unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from vela.api.auth import MAX_TOKEN_TTL_S, Scope, TokenKeys, allows, check_credential
from vela.api.errors import ApiError, Code, to_api_error
from vela.config import Settings
from vela.domain import BuildStatus, WorkerStatus, check_repo_allowlist, split_repo
from vela.errors import Conflict, NotFound, VelaError

if TYPE_CHECKING:  # the API actor (RemoteBackend) loads neither SQLAlchemy nor the queue
    from vela.db.models import Build, Repo, Step, Worker
    from vela.db.store import SecretInfo
    from vela.server.scheduler import Scheduler

log = logging.getLogger(__name__)

# A build is named by its id ({"id": 7}) or, Vela's way, by repo and number
# ({"repo": "org/name", "number": 3}).
BuildRef = dict[str, Any]


class TokenIssuer(Protocol):
    """The TokenAuthority, as the API needs it."""

    async def key_set(self) -> dict[str, Any]: ...

    async def registration_token(self, *, routes: list[str], hostname: str | None,
                                 ttl_s: int | None = None) -> str: ...

    async def mint_api_token(self, *, subject: str, scopes: list[str],
                             ttl_s: int) -> dict[str, Any]: ...


class Backend(Protocol):
    """Every operation of the API. ``OPS`` (below) is this list of names."""

    async def token_keys(self) -> TokenKeys: ...
    async def login(self, *, credential: str, scopes: list[str] | None,
                    ttl_s: int | None) -> dict[str, Any]: ...
    async def mint_token(self, *, subject: str, scopes: list[str],
                         ttl_s: int | None) -> dict[str, Any]: ...
    async def revoke_tokens(self, *, subject: str) -> dict[str, Any]: ...
    async def ready(self) -> dict[str, Any]: ...
    async def status(self) -> dict[str, Any]: ...
    async def list_repos(self) -> list[dict[str, Any]]: ...
    async def get_repo(self, *, repo: str) -> dict[str, Any]: ...
    async def create_build(self, *, repo: str, pipeline: str, route: str | None,
                           timeout_s: int | None) -> dict[str, Any]: ...
    async def list_builds(self, *, repo: str | None, status: list[str] | None,
                          worker: str | None, limit: int, offset: int
                          ) -> list[dict[str, Any]]: ...
    async def get_build(self, *, ref: BuildRef) -> dict[str, Any]: ...
    async def get_logs(self, *, ref: BuildRef, step: int | None,
                       after_id: int) -> list[dict[str, Any]]: ...
    async def poll_build(self, *, ref: BuildRef, after_id: int) -> dict[str, Any]: ...
    async def cancel_build(self, *, ref: BuildRef) -> dict[str, Any]: ...
    async def restart_build(self, *, ref: BuildRef) -> dict[str, Any]: ...
    async def list_workers(self) -> list[dict[str, Any]]: ...
    async def get_worker(self, *, hostname: str) -> dict[str, Any]: ...
    async def set_worker_active(self, *, hostname: str, active: bool) -> dict[str, Any]: ...
    async def list_secrets(self, *, type: str, org: str, target: str
                           ) -> list[dict[str, Any]]: ...
    async def get_secret(self, *, type: str, org: str, target: str,
                         name: str) -> dict[str, Any]: ...
    async def put_secret(self, *, type: str, org: str, target: str, name: str,
                         value: str | None, create: bool,
                         repo_allowlist: list[str] | None = None) -> dict[str, Any]: ...
    async def delete_secret(self, *, type: str, org: str, target: str, name: str) -> None: ...
    async def registration_token(self, *, hostname: str | None, routes: list[str] | None,
                                 ttl_s: int | None) -> dict[str, Any]: ...
    async def queue_stats(self) -> dict[str, Any]: ...


OPS = frozenset(n for n, v in vars(Backend).items() if not n.startswith("_") and callable(v))


async def dispatch(backend: Any, op: str, kwargs: dict[str, Any]) -> Any:
    """Run one named operation; every failure leaves as an :class:`ApiError`."""
    if op not in OPS:
        raise ApiError(500, Code.INTERNAL, f"no API operation {op!r}")
    try:
        return await getattr(backend, op)(**kwargs)
    except Exception as e:
        err = to_api_error(e)
        if err.code is Code.INTERNAL:
            log.exception("API operation %s failed", op)
        raise err from None


class RemoteBackend:
    """A :class:`Backend` whose every operation is ``await call(op, kwargs)``."""

    def __init__(self, call: Callable[[str, dict[str, Any]], Awaitable[Any]]) -> None:
        self._call = call

    def __getattr__(self, op: str) -> Callable[..., Awaitable[Any]]:
        if op not in OPS:
            raise AttributeError(op)

        async def forward(**kwargs: Any) -> Any:
            return await self._call(op, kwargs)

        forward.__name__ = op
        return forward


# -- the implementation -------------------------------------------------------------

def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def repo_out(r: Repo) -> dict[str, Any]:
    return {"id": r.id, "org": r.org, "name": r.name, "full_name": r.full_name,
            "timeout_s": r.timeout_s, "counter": r.counter, "active": r.active,
            "created_at": _iso(r.created_at)}


def build_out(b: Build, repo: str) -> dict[str, Any]:
    return {"id": b.id, "repo": repo, "number": b.number, "route": b.route,
            "status": b.status, "reason": b.reason, "message": b.message, "worker": b.worker,
            "attempts": b.attempts, "timeout_s": b.timeout_s, "parent_id": b.parent_id,
            **{f"{k}_at": _iso(getattr(b, f"{k}_at"))
               for k in ("created", "enqueued", "dispatched", "started", "finished")}}


def step_out(s: Step) -> dict[str, Any]:
    return {"number": s.number, "name": s.name, "image": s.image, "status": s.status,
            "exit_code": s.exit_code, "reason": s.reason, "started_at": _iso(s.started_at),
            "finished_at": _iso(s.finished_at)}


def worker_out(w: Worker, *, connected: bool) -> dict[str, Any]:
    return {"hostname": w.hostname, "address": w.address, "routes": list(w.routes),
            "active": w.active, "connected": connected, "status": w.status,
            "build_limit": w.build_limit, "backlog": w.backlog or 0,
            "running_builds": list(w.running_builds),
            "key_thumbprint": w.key_thumbprint, "actor_name": w.actor_name,
            "registered_at": _iso(w.registered_at),
            **{k: _iso(getattr(w, k)) for k in ("last_checked_in", "last_status_update",
                                                "last_build_started", "last_build_finished")}}


def secret_out(s: SecretInfo) -> dict[str, Any]:
    return {"id": s.id, "type": s.scope, "org": s.org, "target": s.target, "name": s.name,
            "repo_allowlist": list(s.repo_allowlist),
            "created_at": _iso(s.created_at), "updated_at": _iso(s.updated_at)}


class ServerBackend:
    """The API's operations over the server's own parts (no Ray here)."""

    def __init__(self, *, scheduler: Scheduler, issuer: TokenIssuer,
                 settings: Settings) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
        self.builds = scheduler.builds
        self.issuer = issuer
        self.settings = settings

    def __repr__(self) -> str:
        return f"ServerBackend({self.settings.server.id})"

    # -- auth ------------------------------------------------------------------------
    async def token_keys(self) -> TokenKeys:
        """What the API actor checks tokens against: the verifying keys, per retired key
        the instant (epoch seconds) it stops verifying (the API keeps keys a while), and
        per revoked subject the instant before which its tokens are refused."""
        from vela.security.keys import PURPOSE_TOKEN

        revoked = await self.store.api_token_revocations()
        keys = dict((await self.issuer.key_set())["keys"])
        until = {r.kid: r.verify_until.timestamp()
                 for r in await self.store.list_server_keys(PURPOSE_TOKEN)
                 if r.kid in keys and r.retired_at is not None and r.verify_until is not None}
        return {"issuer": self.settings.server.id, "keys": keys, "until": until,
                "revoked": {sub: at.timestamp() for sub, at in revoked.items()}}

    async def login(self, *, credential: str, scopes: list[str] | None,
                    ttl_s: int | None) -> dict[str, Any]:
        name, granted = await check_credential(self.store, credential)
        wanted = list(scopes or granted)
        beyond = [s for s in wanted if not allows(granted, Scope(s))]
        if beyond:
            raise ApiError(403, Code.FORBIDDEN, f"the credential does not grant "
                           f"{', '.join(beyond)}", field="scopes")
        return await self.mint_token(subject=name, scopes=wanted, ttl_s=ttl_s)

    async def mint_token(self, *, subject: str, scopes: list[str],
                         ttl_s: int | None) -> dict[str, Any]:
        return await self.issuer.mint_api_token(
            subject=subject, scopes=sorted(set(scopes)),
            ttl_s=ttl_s or self.settings.api.token_ttl_s)

    async def revoke_tokens(self, *, subject: str) -> dict[str, Any]:
        """Refuse every API token of ``subject`` minted before this returns; tokens minted
        afterwards work. Tokens carry whole seconds, so the cut is the next whole second
        and this waits for it (at most one second)."""
        now = datetime.now(UTC).timestamp()
        cut = float(math.floor(now) + 1)
        longest = timedelta(seconds=max(MAX_TOKEN_TTL_S, self.settings.api.token_ttl_s))
        before = datetime.fromtimestamp(cut, UTC)
        await self.store.revoke_api_tokens(subject, before=before, until=before + longest)
        await asyncio.sleep(max(cut - datetime.now(UTC).timestamp(), 0.0))
        return {"subject": subject, "revoked_before": cut}

    # -- health --------------------------------------------------------------------------
    async def ready(self) -> dict[str, Any]:
        checks = {"scheduler": True}
        try:
            await self.store.count_builds(BuildStatus.RUNNING)
            checks["database"] = True
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            log.warning("readiness: database unreachable: %s", type(e).__name__)
            checks["database"] = False
        try:
            await self.builds.queue.depth()
            checks["queue"] = True
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            log.warning("readiness: queue unreachable: %s", type(e).__name__)
            checks["queue"] = False
        return {"ready": all(checks.values()), "checks": checks}

    async def status(self) -> dict[str, Any]:
        sched = self.scheduler.status()
        workers = await self.store.list_workers()
        by_status = {s.value: 0 for s in WorkerStatus}
        for w in workers:
            if w.active and w.hostname in self.scheduler.registry:
                by_status[w.status] = by_status.get(w.status, 0) + 1
        return {
            "server": self.settings.server.id,
            "workers": {"registered": len(workers), "connected": len(sched["workers"]),
                        "inactive": sum(1 for w in workers if not w.active),
                        "by_status": by_status},
            "free_slots": sched["free_slots"],
            "builds": {s.value: await self.store.count_builds(s)
                       for s in (BuildStatus.PENDING, BuildStatus.RUNNING)},
            "queue": await self.queue_stats(),
            "scheduler": sched["stats"],
            # Coalesced calls: how many requests each carried (the Scheduler's view).
            "calls": sched["calls"],
        }

    async def queue_stats(self) -> dict[str, Any]:
        from vela.queue import RouteDepth

        rows = {r: RouteDepth() for r in self.settings.queue.routes}
        rows.update(await self.builds.queue.depth())
        return {"backend": self.settings.queue.backend,
                "routes": {r: d.as_dict() for r, d in rows.items()}}

    # -- repos and builds ------------------------------------------------------------------
    async def list_repos(self) -> list[dict[str, Any]]:
        return [repo_out(r) for r in await self.store.list_repos()]

    async def get_repo(self, *, repo: str) -> dict[str, Any]:
        split_repo(repo)
        return repo_out(await self.store.get_repo(repo))

    async def _build(self, ref: BuildRef) -> Build:
        if "id" in ref:
            return await self.store.get_build(int(ref["id"]))
        split_repo(ref["repo"])
        return await self.store.get_build_by_number(ref["repo"], int(ref["number"]))

    async def _out(self, build: Build) -> dict[str, Any]:
        return build_out(build, (await self.store.repo_of(build)).full_name)

    async def create_build(self, *, repo: str, pipeline: str, route: str | None,
                           timeout_s: int | None) -> dict[str, Any]:
        split_repo(repo)
        build = await self.builds.create(repo, pipeline, route=route or self.builds.routes[0],
                                         timeout_s=timeout_s)
        return build_out(build, repo)

    async def list_builds(self, *, repo: str | None, status: list[str] | None,
                          worker: str | None, limit: int, offset: int
                          ) -> list[dict[str, Any]]:
        if repo is not None:
            split_repo(repo)
        builds = await self.store.list_builds(
            repo=repo, status=[BuildStatus(s) for s in status] if status else None,
            worker=worker, limit=limit, offset=offset)
        names = {r.id: r.full_name for r in await self.store.list_repos()} if builds else {}
        return [build_out(b, names[b.repo_id]) for b in builds]

    async def get_build(self, *, ref: BuildRef) -> dict[str, Any]:
        build = await self._build(ref)
        return {**await self._out(build),
                "steps": [step_out(s) for s in await self.store.get_steps(build.id)]}

    async def get_logs(self, *, ref: BuildRef, step: int | None,
                       after_id: int) -> list[dict[str, Any]]:
        build = await self._build(ref)
        if step is not None and step not in {s.number for s in
                                             await self.store.get_steps(build.id)}:
            raise NotFound(f"build {build.id} has no step {step}")
        return [{"id": i, "step": n, "text": text}
                for i, n, text in await self.store.get_logs(build.id, number=step,
                                                            after_id=after_id)]

    async def poll_build(self, *, ref: BuildRef, after_id: int) -> dict[str, Any]:
        """The build, its steps and its log chunks after ``after_id`` (in the order
        written), read in that order so a terminal status comes with every log line."""
        build = await self._build(ref)
        steps = [step_out(s) for s in await self.store.get_steps(build.id)]
        logs = sorted(await self.store.get_logs(build.id, after_id=after_id))
        return {"build": await self._out(build), "steps": steps,
                "logs": [{"id": i, "step": n, "text": text} for i, n, text in logs]}

    async def cancel_build(self, *, ref: BuildRef) -> dict[str, Any]:
        build = await self._build(ref)
        if BuildStatus(build.status).terminal:
            raise Conflict(f"build {build.id} has ended already ({build.status})")
        status = await self.scheduler.cancel(build.id)
        if status is not BuildStatus.CANCELED:  # it ended on its own meanwhile
            raise Conflict(f"build {build.id} has ended already ({status.value})")
        return await self._out(await self.store.get_build(build.id))

    async def restart_build(self, *, ref: BuildRef) -> dict[str, Any]:
        build = await self._build(ref)
        return await self._out(await self.builds.restart(build.id))

    # -- workers ---------------------------------------------------------------------------
    async def list_workers(self) -> list[dict[str, Any]]:
        return [worker_out(w, connected=w.hostname in self.scheduler.registry)
                for w in await self.store.list_workers()]

    async def get_worker(self, *, hostname: str) -> dict[str, Any]:
        w = await self.store.get_worker(hostname)
        return worker_out(w, connected=hostname in self.scheduler.registry)

    async def set_worker_active(self, *, hostname: str, active: bool) -> dict[str, Any]:
        await self.scheduler.set_worker_active(hostname, active)
        return await self.get_worker(hostname=hostname)

    async def registration_token(self, *, hostname: str | None, routes: list[str] | None,
                                 ttl_s: int | None) -> dict[str, Any]:
        known = list(self.settings.queue.routes)
        routes = list(routes or known)
        unknown = sorted(set(routes) - set(known))
        if unknown:
            raise ApiError(422, Code.VALIDATION_FAILED,
                           f"routes: {', '.join(unknown)} not in queue.routes "
                           f"({', '.join(known)})", field="routes")
        ttl = ttl_s or self.settings.tokens.registration_ttl_s
        token = await self.issuer.registration_token(routes=routes, hostname=hostname,
                                                     ttl_s=ttl)
        return {"token": token, "hostname": hostname, "routes": routes, "ttl_s": ttl}

    # -- secrets ---------------------------------------------------------------------------
    @staticmethod
    def _target(type: str, target: str) -> str:
        if type == "org":
            return "*"
        if target == "*":
            raise ApiError(422, Code.VALIDATION_FAILED, f"name: a {type} secret needs a "
                           f"{'repo' if type == 'repo' else 'team'} name, not *", field="name")
        return target

    async def list_secrets(self, *, type: str, org: str, target: str
                           ) -> list[dict[str, Any]]:
        target = self._target(type, target)
        return [secret_out(s) for s in await self.store.list_secrets(org=org)
                if s.scope == type and s.target == target]

    async def get_secret(self, *, type: str, org: str, target: str,
                         name: str) -> dict[str, Any]:
        for s in await self.list_secrets(type=type, org=org, target=target):
            if s["name"] == name:
                return s
        raise NotFound(f"secret {name} ({type} {org}/{self._target(type, target)}) not found")

    async def put_secret(self, *, type: str, org: str, target: str, name: str,
                         value: str | None, create: bool,
                         repo_allowlist: list[str] | None = None) -> dict[str, Any]:
        """Create (``create``: must not exist) or update (must exist) a secret; an
        update leaves what is None as it is."""
        if type == "repo":
            split_repo(f"{org}/{target}")
        if repo_allowlist is not None:
            try:
                check_repo_allowlist(type, org, repo_allowlist)
            except VelaError as e:
                raise ApiError(422, Code.VALIDATION_FAILED, f"repo_allowlist: {e}",
                               field="repo_allowlist") from None
        try:
            info = await self.store.put_secret(type, org, self._target(type, target), name,
                                               value, exists=not create,
                                               repo_allowlist=repo_allowlist)
        except Conflict:
            raise Conflict(f"secret {name} exists already; update it with PUT") from None
        except NotFound:
            raise NotFound(f"secret {name} not found; create it with POST") from None
        return secret_out(info)

    async def delete_secret(self, *, type: str, org: str, target: str, name: str) -> None:
        await self.store.delete_secret(type, org, self._target(type, target), name)
