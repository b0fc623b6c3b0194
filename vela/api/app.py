"""The HTTP API: a FastAPI app over a :class:`~vela.api.backend.Backend`.

Paths follow Vela's under ``/api/v1`` (builds live under their repo and are
named by number; ``/api/v1/builds/{id}`` names them by id as the CLI does).
Every endpoint but ``/health`` and ``/ready`` needs an API token with the
scope it names; errors are ``{"code", "message"}`` (:mod:`vela.api.errors`).
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of the
# handlers below at runtime, and some name objects local to create_app.
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from vela import __version__
from vela.api.auth import Authenticator, Scope
from vela.api.backend import Backend, BuildRef
from vela.api.errors import ApiError, Code, to_api_error
from vela.api.models import (
    NAME,
    STORED_SECRET_NAME,
    BuildCreate,
    BuildDetail,
    BuildOut,
    ErrorOut,
    Health,
    LogChunk,
    LoginRequest,
    QueueStatsOut,
    Ready,
    RegistrationTokenOut,
    RegistrationTokenRequest,
    RepoOut,
    RevokedOut,
    RevokeRequest,
    SecretCreate,
    SecretOut,
    SecretUpdate,
    StepOut,
    TokenOut,
    TokenRequest,
    UserOut,
    WorkerOut,
    WorkerUpdate,
)
from vela.domain import BuildStatus
from vela.errors import VelaError
from vela.security import ApiClaims

log = logging.getLogger(__name__)

# Ids are 64-bit in the database; larger numbers are a validation error, not a crash.
MAX_ID = 2**63 - 1
PREFIX = "/api/v1"
NDJSON = "application/x-ndjson"
# Checks the request's token again (see create_app.recheck).
Recheck = Callable[[], Awaitable[ApiClaims]]
SecretType = Literal["repo", "org", "shared"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _field(loc: tuple[Any, ...]) -> str:
    """``("body", "scopes", 0)`` → ``scopes[0]``; the request part is dropped."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or str(loc[0] if loc else "body")


def create_app(backend: Backend, *, poll_s: float = 0.25,
               clock: Callable[[], datetime] = _utcnow) -> FastAPI:
    """The API over ``backend``; ``poll_s`` paces ``logs?follow=true``."""
    app = FastAPI(title="Vela on Ray", version=__version__,
                  openapi_url=f"{PREFIX}/openapi.json", docs_url=f"{PREFIX}/docs",
                  redoc_url=None,
                  description="Builds, logs, workers, secrets and registration tokens of a "
                              "Vela on Ray server. Authenticate with `Authorization: Bearer "
                              "<API token>` (`POST /api/v1/login` exchanges the admin "
                              "credential for one).")
    auth = Authenticator(backend.token_keys, clock=clock)
    bearer = HTTPBearer(auto_error=False, scheme_name="apiToken",
                        description="An API token (`vela login`).")

    # -- errors: one shape everywhere ----------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "")}
                   for e in exc.errors()]
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        err = ApiError(422, Code.VALIDATION_FAILED, f"{first['field']}: {first['message']}",
                       field=first["field"], details=details)
        return JSONResponse(err.body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED}.get(exc.status_code,
                                                                       Code.BAD_REQUEST)
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"code": code.value, "message": message},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(VelaError)
    async def _domain(_: Request, exc: VelaError) -> JSONResponse:
        err = to_api_error(exc)  # an in-process backend raises Vela's own errors
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        if err.code is Code.INTERNAL:
            log.error("API request failed", exc_info=exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    # -- auth --------------------------------------------------------------------------------
    def need(scope: Scope | None) -> Callable[..., Any]:
        async def check(creds: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(bearer)]) -> ApiClaims:
            claims = await auth.authenticate(creds.credentials if creds else None)
            if scope is not None:
                auth.authorize(claims, scope)
            return claims

        return check

    def allowed(scope: Scope | None) -> Any:
        return Depends(need(scope))

    async def recheck(creds: Annotated[HTTPAuthorizationCredentials | None,
                                       Depends(bearer)]) -> Recheck:
        """The request's token checked again later (a long stream): it may have expired
        or been revoked since the request began."""
        token = creds.credentials if creds else None
        return lambda: auth.authenticate(token)

    # -- health --------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["health"])
    async def health() -> dict[str, Any]:
        """The API process is up (no token needed)."""
        return {"status": "ok"}

    @app.get("/ready", response_model=Ready, tags=["health"],
             responses={503: {"model": Ready}})
    async def ready(response: Response) -> dict[str, Any]:
        """The database, queue and Scheduler answer (no token needed)."""
        try:
            result = await backend.ready()
        except ApiError:
            result = {"ready": False, "checks": {"scheduler": False}}
        if not result["ready"]:
            response.status_code = 503
        return result

    # Every operation may answer these, each with the one error body.
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorOut} for status in (400, 401, 403, 404, 409, 422, 503)}
    api = APIRouter(prefix=PREFIX, responses=errors)
    full_paths = APIRouter(responses=errors)  # routes written with their whole path

    # -- login and tokens ---------------------------------------------------------------------
    @api.post("/login", response_model=TokenOut, tags=["auth"])
    async def login(body: LoginRequest) -> dict[str, Any]:
        """Exchange the admin credential for an API token."""
        return await backend.login(credential=body.credential,
                                   scopes=[s.value for s in body.scopes] if body.scopes
                                   else None, ttl_s=body.ttl_s)

    @api.post("/tokens", response_model=TokenOut, status_code=201, tags=["auth"])
    async def mint_token(body: TokenRequest,
                         claims: ApiClaims = allowed(Scope.ADMIN)) -> dict[str, Any]:
        """Mint an API token with the given scopes (e.g. for a CI job)."""
        return await backend.mint_token(subject=body.subject,
                                        scopes=[s.value for s in body.scopes],
                                        ttl_s=body.ttl_s)

    @api.post("/tokens/revoke", response_model=RevokedOut, tags=["auth"])
    async def revoke_tokens(body: RevokeRequest,
                            claims: ApiClaims = allowed(Scope.ADMIN)) -> dict[str, Any]:
        """Revoke every API token of a subject minted so far (a leaked token, a retired CI
        job); tokens minted after this returns work. Revoking your own subject logs you
        out too."""
        out = await backend.revoke_tokens(subject=body.subject)
        auth.forget()
        return out

    @api.get("/user", response_model=UserOut, tags=["auth"])
    async def whoami(claims: ApiClaims = allowed(None)) -> dict[str, Any]:
        """Who the token is for, what it may do, when it expires."""
        return {"subject": claims.sub, "scopes": claims.scp, "expires_at": claims.exp}

    # -- repos and builds ---------------------------------------------------------------------
    Org = Annotated[str, Path(pattern=NAME)]
    RepoName = Annotated[str, Path(pattern=NAME)]
    Page = Annotated[int, Query(ge=1, le=100_000)]
    PerPage = Annotated[int, Query(ge=1, le=100)]
    Statuses = Annotated[list[BuildStatus] | None, Query()]

    @api.get("/repos", response_model=list[RepoOut], tags=["repos"])
    async def list_repos(claims: ApiClaims = allowed(Scope.BUILDS_READ)) -> Any:
        return await backend.list_repos()

    @api.get("/repos/{org}/{repo}", response_model=RepoOut, tags=["repos"])
    async def get_repo(org: Org, repo: RepoName,
                       claims: ApiClaims = allowed(Scope.BUILDS_READ)) -> Any:
        return await backend.get_repo(repo=f"{org}/{repo}")

    @api.post("/repos/{org}/{repo}/builds", response_model=BuildOut, status_code=201,
              tags=["builds"])
    async def create_build(org: Org, repo: RepoName, body: BuildCreate, response: Response,
                           claims: ApiClaims = allowed(Scope.BUILDS_WRITE)) -> Any:
        """Compile the pipeline, store the build ``pending`` and queue it."""
        build = await backend.create_build(repo=f"{org}/{repo}", pipeline=body.pipeline,
                                           route=body.route, timeout_s=body.timeout_s)
        response.headers["Location"] = f"{PREFIX}/repos/{org}/{repo}/builds/{build['number']}"
        return build

    @api.get("/repos/{org}/{repo}/builds", response_model=list[BuildOut], tags=["builds"])
    async def list_repo_builds(org: Org, repo: RepoName, status: Statuses = None,
                               page: Page = 1, per_page: PerPage = 20,
                               claims: ApiClaims = allowed(Scope.BUILDS_READ)) -> Any:
        """The repo's builds, newest first."""
        return await backend.list_builds(repo=f"{org}/{repo}",
                                         status=[s.value for s in status or []] or None,
                                         worker=None, limit=per_page,
                                         offset=(page - 1) * per_page)

    @api.get("/builds", response_model=list[BuildOut], tags=["builds"])
    async def list_builds(repo: Annotated[str | None, Query(pattern=r"^[^/]+/[^/]+$")] = None,
                          status: Statuses = None, worker: str | None = None,
                          page: Page = 1, per_page: PerPage = 20,
                          claims: ApiClaims = allowed(Scope.BUILDS_READ)) -> Any:
        """Every repo's builds, newest first, filtered by repo, status and worker."""
        return await backend.list_builds(repo=repo,
                                         status=[s.value for s in status or []] or None,
                                         worker=worker, limit=per_page,
                                         offset=(page - 1) * per_page)

    def by_number(org: Org, repo: RepoName,
                  number: Annotated[int, Path(ge=1, le=MAX_ID)]) -> BuildRef:
        return {"repo": f"{org}/{repo}", "number": number}

    def by_id(build_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> BuildRef:
        return {"id": build_id}

    for base, ref_of, tag in ((PREFIX + "/repos/{org}/{repo}/builds/{number}", by_number,
                               "builds"),
                              (PREFIX + "/builds/{build_id}", by_id, "builds by id")):
        _build_routes(full_paths, backend, base=base, ref_of=ref_of, tag=tag,
                      allowed=allowed, recheck=Depends(recheck), poll_s=poll_s)

    # -- workers and the queue --------------------------------------------------------------
    @api.get("/workers", response_model=list[WorkerOut], tags=["workers"])
    async def list_workers(claims: ApiClaims = allowed(Scope.WORKERS_READ)) -> Any:
        return await backend.list_workers()

    @api.get("/workers/{hostname}", response_model=WorkerOut, tags=["workers"])
    async def get_worker(hostname: Annotated[str, Path(pattern=NAME)],
                         claims: ApiClaims = allowed(Scope.WORKERS_READ)) -> Any:
        return await backend.get_worker(hostname=hostname)

    @api.put("/workers/{hostname}", response_model=WorkerOut, tags=["workers"])
    async def update_worker(hostname: Annotated[str, Path(pattern=NAME)], body: WorkerUpdate,
                            claims: ApiClaims = allowed(Scope.WORKERS_WRITE)) -> Any:
        """Deactivate (no new builds; running ones go on) or activate a worker."""
        return await backend.set_worker_active(hostname=hostname, active=body.active)

    @api.post("/admin/registration-tokens", response_model=RegistrationTokenOut,
              status_code=201, tags=["workers"])
    async def registration_token(body: RegistrationTokenRequest,
                                 claims: ApiClaims = allowed(Scope.ADMIN)) -> Any:
        """A one-time token a new worker registers with (shown once, stored hashed)."""
        return await backend.registration_token(hostname=body.hostname, routes=body.routes,
                                                ttl_s=body.ttl_s)

    @api.get("/queue/stats", response_model=QueueStatsOut, tags=["queue"])
    async def queue_stats(claims: ApiClaims = allowed(Scope.WORKERS_READ)) -> Any:
        return await backend.queue_stats()

    @api.get("/status", tags=["queue"])
    async def status(claims: ApiClaims = allowed(Scope.WORKERS_READ)) -> Any:
        """Workers, free slots, queue depth and builds in flight, at a glance."""
        return await backend.status()

    # -- secrets (values are write-only) ---------------------------------------------------
    SecretPath = PREFIX + "/secrets/native/{type}/{org}/{name}"
    # {name}: the repo (type repo), the team (shared) or * (org).
    Owner = Annotated[str, Path(pattern=r"^(\*|[A-Za-z0-9_.-]{1,250})$")]

    @full_paths.get(SecretPath, response_model=list[SecretOut], tags=["secrets"])
    async def list_secrets(type: SecretType, org: Org, name: Owner,
                           claims: ApiClaims = allowed(Scope.SECRETS_READ)) -> Any:
        """Secrets of a repo (``repo/org/name``), an org (``org/org/*``) or a team
        (``shared/org/team``): names, dates and a shared secret's repo allowlist, never
        values."""
        return await backend.list_secrets(type=type, org=org, target=name)

    @full_paths.post(SecretPath, response_model=SecretOut, status_code=201, tags=["secrets"])
    async def create_secret(type: SecretType, org: Org, name: Owner, body: SecretCreate,
                            claims: ApiClaims = allowed(Scope.SECRETS_WRITE)) -> Any:
        return await backend.put_secret(type=type, org=org, target=name, name=body.name,
                                        value=body.value, create=True,
                                        repo_allowlist=body.repo_allowlist)

    SecretName = Annotated[str, Path(pattern=STORED_SECRET_NAME)]

    @full_paths.get(SecretPath + "/{secret}", response_model=SecretOut, tags=["secrets"])
    async def get_secret(type: SecretType, org: Org, name: Owner, secret: SecretName,
                         claims: ApiClaims = allowed(Scope.SECRETS_READ)) -> Any:
        return await backend.get_secret(type=type, org=org, target=name, name=secret)

    @full_paths.put(SecretPath + "/{secret}", response_model=SecretOut, tags=["secrets"])
    async def update_secret(type: SecretType, org: Org, name: Owner, secret: SecretName,
                            body: SecretUpdate,
                            claims: ApiClaims = allowed(Scope.SECRETS_WRITE)) -> Any:
        return await backend.put_secret(type=type, org=org, target=name, name=secret,
                                        value=body.value, create=False,
                                        repo_allowlist=body.repo_allowlist)

    @full_paths.delete(SecretPath + "/{secret}", status_code=204, tags=["secrets"])
    async def delete_secret(type: SecretType, org: Org, name: Owner, secret: SecretName,
                            claims: ApiClaims = allowed(Scope.SECRETS_WRITE)) -> Response:
        await backend.delete_secret(type=type, org=org, target=name, name=secret)
        return Response(status_code=204)

    app.include_router(api)
    app.include_router(full_paths)
    return app


def _build_routes(app: APIRouter, backend: Backend, *, base: str,
                  ref_of: Callable[..., BuildRef], tag: str,
                  allowed: Callable[[Scope | None], Any], recheck: Any,
                  poll_s: float) -> None:
    """One build's endpoints under ``base`` (by repo and number, or by id)."""
    Ref = Annotated[BuildRef, Depends(ref_of)]
    StepNo = Annotated[int, Path(ge=1, le=10_000)]

    @app.get(base, response_model=BuildDetail, tags=[tag])
    async def get_build(ref: Ref, claims: ApiClaims = allowed(Scope.BUILDS_READ)) -> Any:
        return await backend.get_build(ref=ref)

    @app.post(base, response_model=BuildOut, status_code=201, tags=[tag])
    async def restart_build(ref: Ref, claims: ApiClaims = allowed(Scope.BUILDS_WRITE)) -> Any:
        """Restart: a new build of the same repo with the same pipeline."""
        return await backend.restart_build(ref=ref)

    @app.delete(base + "/cancel", response_model=BuildOut, tags=[tag])
    async def cancel_build(ref: Ref, claims: ApiClaims = allowed(Scope.BUILDS_WRITE)) -> Any:
        """Cancel a pending or running build (409 if it has ended)."""
        return await backend.cancel_build(ref=ref)

    @app.get(base + "/steps", response_model=list[StepOut], tags=[tag])
    async def list_steps(ref: Ref, claims: ApiClaims = allowed(Scope.BUILDS_READ)) -> Any:
        return (await backend.get_build(ref=ref))["steps"]

    @app.get(base + "/steps/{step}", response_model=StepOut, tags=[tag])
    async def get_step(ref: Ref, step: StepNo,
                       claims: ApiClaims = allowed(Scope.BUILDS_READ)) -> Any:
        build = await backend.get_build(ref=ref)
        for s in build["steps"]:
            if s["number"] == step:
                return s
        raise ApiError(404, Code.NOT_FOUND, f"build {build['id']} has no step {step}")

    @app.get(base + "/logs", response_model=list[LogChunk], tags=[tag],
             responses={200: {"content": {NDJSON: {}},
                              "description": "with follow=true: NDJSON events until the "
                                             "build ends"}})
    async def get_logs(ref: Ref, follow: bool = False,
                       after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                       claims: ApiClaims = allowed(Scope.BUILDS_READ),
                       still_valid: Recheck = recheck) -> Any:
        """The build's log chunks. ``follow=true`` streams NDJSON events — ``build``
        (status changes), ``step``, ``log`` — and a last ``end`` once the build ends;
        or ``error`` if the token expires or is revoked meanwhile (checked each poll)."""
        if follow:
            first = await backend.poll_build(ref=ref, after_id=after)  # 404 before streaming

            async def poll(after_id: int) -> dict[str, Any]:
                await still_valid()
                return await backend.poll_build(ref=ref, after_id=after_id)

            return StreamingResponse(_follow(poll, first, after, poll_s), media_type=NDJSON)
        return await backend.get_logs(ref=ref, step=None, after_id=after)

    @app.get(base + "/steps/{step}/logs", response_model=list[LogChunk], tags=[tag])
    async def get_step_logs(ref: Ref, step: StepNo,
                            claims: ApiClaims = allowed(Scope.BUILDS_READ)) -> Any:
        return await backend.get_logs(ref=ref, step=step, after_id=0)


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":")) + "\n").encode()


async def _follow(poll: Callable[[int], Awaitable[dict[str, Any]]], view: dict[str, Any],
                  after: int, poll_s: float) -> AsyncIterator[bytes]:
    """Events until the build is terminal; a ``poll`` every ``poll_s`` (the client going
    away cancels this generator)."""
    status = ""
    steps: dict[int, str] = {}
    while True:
        build = view["build"]
        if build["status"] != status:
            status = build["status"]
            yield _line({"event": "build", "build": build})
        for step in view["steps"]:
            if steps.get(step["number"]) != step["status"]:
                steps[step["number"]] = step["status"]
                yield _line({"event": "step", "step": step})
        for chunk in view["logs"]:
            after = max(after, chunk["id"])
            yield _line({"event": "log", **chunk})
        if BuildStatus(status).terminal:
            yield _line({"event": "end", "status": status, "reason": build["reason"]})
            return
        await asyncio.sleep(poll_s)
        try:
            view = await poll(after)
        except Exception as e:  # noqa: BLE001 - the stream has begun: say why it ends
            err = to_api_error(e)
            yield _line({"event": "error", **err.body()})
            return
