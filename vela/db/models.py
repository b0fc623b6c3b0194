"""Tables. Shapes follow Vela's (repos, builds, steps, logs, secrets, workers)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from vela.domain import DEFAULT_ROUTE

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both back ends (SQLite drops the zone on the way in)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use UTC-aware times")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Repo(Base):
    __tablename__ = "repos"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org: Mapped[str] = mapped_column(String(250))
    name: Mapped[str] = mapped_column(String(250))
    full_name: Mapped[str] = mapped_column(String(500), unique=True)
    timeout_s: Mapped[int] = mapped_column(Integer, default=3600)
    counter: Mapped[int] = mapped_column(Integer, default=0)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Build(Base):
    __tablename__ = "builds"
    __table_args__ = (UniqueConstraint("repo_id", "number", name="uq_builds_repo_number"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    route: Mapped[str] = mapped_column(String(250), default=DEFAULT_ROUTE)
    status: Mapped[str] = mapped_column(String(20), index=True)
    timeout_s: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(250), nullable=True, index=True)
    # jti of the one build token that may report on this build right now.
    token_jti: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    executable: Mapped[str] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Step(Base):
    __tablename__ = "steps"
    __table_args__ = (UniqueConstraint("build_id", "number", name="uq_steps_build_number"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(250))
    image: Mapped[str] = mapped_column(String(500), default="")
    status: Mapped[str] = mapped_column(String(20))
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Log(Base):
    __tablename__ = "logs"
    __table_args__ = (UniqueConstraint("step_id", "seq", name="uq_logs_step_seq"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    data: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Secret(Base):
    __tablename__ = "secrets"
    __table_args__ = (
        UniqueConstraint("scope", "org", "target", "name", name="uq_secrets_scope_name"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # repo: org + repo name; org: every repo of the org; shared: org + team.
    scope: Mapped[str] = mapped_column(String(10))
    org: Mapped[str] = mapped_column(String(250))
    target: Mapped[str] = mapped_column(String(250))
    name: Mapped[str] = mapped_column(String(250))
    # AES-GCM nonce || ciphertext; associated data binds scope, org, target, name.
    value_enc: Mapped[bytes] = mapped_column(LargeBinary)
    # shared: the repos (org/name, of the secret's org) whose builds get it; none: no repo.
    repo_allowlist: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Worker(Base):
    __tablename__ = "workers"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    hostname: Mapped[str] = mapped_column(String(250), unique=True)
    address: Mapped[str] = mapped_column(String(500), default="")
    routes: Mapped[list[str]] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(20))
    build_limit: Mapped[int] = mapped_column(Integer, default=1)
    # Builds it holds beyond its slots, each started when one frees (worker.backlog).
    backlog: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    running_builds: Mapped[list[int]] = mapped_column(JSON)
    sign_public_key: Mapped[str] = mapped_column(String(100))
    seal_public_key: Mapped[str] = mapped_column(String(100))
    key_thumbprint: Mapped[str] = mapped_column(String(100))
    ray_node_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    actor_name: Mapped[str | None] = mapped_column(String(300), nullable=True)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_checked_in: Mapped[datetime | None] = mapped_column(UTCDateTime(),
                                                             nullable=True)
    last_status_update: Mapped[datetime | None] = mapped_column(UTCDateTime(),
                                                                nullable=True)
    last_build_started: Mapped[datetime | None] = mapped_column(UTCDateTime(),
                                                                nullable=True)
    last_build_finished: Mapped[datetime | None] = mapped_column(UTCDateTime(),
                                                                 nullable=True)


class RegistrationToken(Base):
    __tablename__ = "registration_tokens"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # SHA-256 of the token; the token itself is shown once and never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hostname: Mapped[str | None] = mapped_column(String(250), nullable=True)
    routes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(250), nullable=True)


class ApiCredential(Base):
    """A long-lived credential for people and tools (the admin credential of the first
    `vela serve`); it is exchanged for short-lived API tokens at ``/api/v1/login``."""

    __tablename__ = "api_credentials"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(250), unique=True)
    # SHA-256 of the credential; the credential itself is shown once and never stored.
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ApiTokenRevocation(Base):
    """Every API token of ``subject`` issued before ``revoked_before`` is refused; the
    row can go once no such token can still be valid (``expires_at``)."""

    __tablename__ = "api_token_revocations"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(250), unique=True)
    revoked_before: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ServerKey(Base):
    __tablename__ = "server_keys"
    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(20))  # "token" or "queue"
    # Ed25519 private key (raw 32 bytes) encrypted under the master key.
    private_enc: Mapped[bytes] = mapped_column(LargeBinary)
    public_key: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # After this instant no token signed by the key can still be valid.
    verify_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class QueueItem(Base):
    """The database queue back end (the embedded default)."""

    __tablename__ = "queue_items"
    # Ids are never reused on SQLite, so a stale lease can never match a new item.
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    route: Mapped[str] = mapped_column(String(250), index=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    # ready | leased | dead
    state: Mapped[str] = mapped_column(String(10), index=True)
    lease_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    dead_at: Mapped[float | None] = mapped_column(Float, nullable=True)
