"""Bodies the API accepts and returns (pydantic: they cross a trust boundary)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vela import pipeline
from vela.api.auth import MAX_TOKEN_TTL_S, Scope
from vela.domain import MAX_REPO_ALLOWLIST, BuildStatus

MAX_PIPELINE_CHARS = 256_000
MAX_SECRET_CHARS = 64_000
NAME = r"^[A-Za-z0-9_.-]{1,250}$"
# A secret named `api_key` reaches a step as $API_KEY, so it must make an env name,
# and one a pipeline can name.
SECRET_NAME = f"^{pipeline.SECRET_NAME}$"
# Secrets stored before new names were held to that stay readable and removable.
STORED_SECRET_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,249}$"  # noqa: S105 - a pattern


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorOut(_Out):
    """Every error the API answers: a stable code and a message for people."""

    code: str
    message: str
    reason: str | None = None
    field: str | None = None
    details: list[dict[str, Any]] | None = None


# -- requests -------------------------------------------------------------------------

class LoginRequest(_In):
    credential: str = Field(min_length=1, max_length=500, repr=False)
    scopes: list[Scope] | None = Field(default=None, min_length=1,
                                       description="default (left out): all of the "
                                       "credential's scopes")
    ttl_s: int | None = Field(default=None, ge=60, le=MAX_TOKEN_TTL_S)


class TokenRequest(_In):
    subject: str = Field(min_length=1, max_length=250, description="who or what uses it")
    scopes: list[Scope] = Field(min_length=1)
    ttl_s: int | None = Field(default=None, ge=60, le=MAX_TOKEN_TTL_S)


class BuildCreate(_In):
    pipeline: str = Field(min_length=1, max_length=MAX_PIPELINE_CHARS,
                          description="the pipeline YAML")
    route: str | None = Field(default=None, pattern=NAME,
                              description="queue route (default: the server's first)")
    timeout_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)


_ALLOWLIST_HELP = ("shared secrets only: the repos (org/name, of the secret's org) whose "
                   "builds may use it; no other repo's can")


class SecretCreate(_In):
    name: str = Field(pattern=SECRET_NAME)
    value: str = Field(min_length=1, max_length=MAX_SECRET_CHARS, repr=False,
                       description="write-only: no endpoint ever returns it")
    repo_allowlist: list[str] = Field(default_factory=list, max_length=MAX_REPO_ALLOWLIST,
                                      description=_ALLOWLIST_HELP)


class SecretUpdate(_In):
    """What it leaves out stays as it is."""

    value: str | None = Field(default=None, min_length=1, max_length=MAX_SECRET_CHARS,
                              repr=False)
    repo_allowlist: list[str] | None = Field(default=None, max_length=MAX_REPO_ALLOWLIST,
                                             description=_ALLOWLIST_HELP)

    @model_validator(mode="after")
    def _changes_something(self) -> SecretUpdate:
        if self.value is None and self.repo_allowlist is None:
            raise ValueError("give a value, a repo_allowlist or both")
        return self


class WorkerUpdate(_In):
    active: bool


class RegistrationTokenRequest(_In):
    hostname: str | None = Field(default=None, pattern=NAME,
                                 description="bind the token to this worker hostname")
    routes: list[str] | None = Field(default=None, description="default: every queue route")
    ttl_s: int | None = Field(default=None, ge=10, le=7 * 24 * 3600)


# -- responses ------------------------------------------------------------------------

class TokenOut(_Out):
    token: str = Field(repr=False)
    subject: str
    scopes: list[str]
    expires_at: int = Field(description="Unix time")


class RevokeRequest(_In):
    subject: str = Field(min_length=1, max_length=250,
                         description="whose tokens: every one minted before this call "
                                     "returns is refused from then on")


class RevokedOut(_Out):
    subject: str
    revoked_before: float = Field(description="Unix time: tokens issued before are refused")


class UserOut(_Out):
    subject: str
    scopes: list[str]
    expires_at: int


class RepoOut(_Out):
    id: int
    org: str
    name: str
    full_name: str
    timeout_s: int
    counter: int
    active: bool
    created_at: str


class StepOut(_Out):
    number: int
    name: str
    image: str = ""
    status: str
    exit_code: int | None = None
    reason: str | None = None
    started_at: str | None = None
    finished_at: str | None = None


class BuildOut(_Out):
    id: int
    repo: str
    number: int
    route: str
    status: BuildStatus
    reason: str | None = None
    message: str | None = None
    worker: str | None = None
    attempts: int
    timeout_s: int
    parent_id: int | None = None
    created_at: str
    enqueued_at: str | None = None
    dispatched_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None


class BuildDetail(BuildOut):
    steps: list[StepOut]


class LogChunk(_Out):
    id: int
    step: int
    text: str


class WorkerOut(_Out):
    hostname: str
    address: str
    routes: list[str]
    active: bool
    connected: bool = Field(description="attached to the Scheduler right now")
    status: str
    build_limit: int
    backlog: int = Field(0, description="builds it holds beyond its slots, each started "
                                        "when one frees (worker.backlog)")
    running_builds: list[int] = Field(description="builds it runs or holds")
    key_thumbprint: str
    actor_name: str | None = None
    registered_at: str
    last_checked_in: str | None = None
    last_status_update: str | None = None
    last_build_started: str | None = None
    last_build_finished: str | None = None


class SecretOut(_Out):
    id: int
    type: Literal["repo", "org", "shared"]
    org: str
    target: str
    name: str
    repo_allowlist: list[str]
    created_at: str
    updated_at: str


class RegistrationTokenOut(_Out):
    token: str = Field(repr=False)
    hostname: str | None
    routes: list[str]
    ttl_s: int


class RouteDepthOut(_Out):
    ready: int
    in_flight: int
    dead: int


class QueueStatsOut(_Out):
    backend: str
    routes: dict[str, RouteDepthOut]


class Health(_Out):
    status: str


class Ready(_Out):
    ready: bool
    checks: dict[str, bool]
