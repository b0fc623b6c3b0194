"""One settings model. Sources, later wins: defaults, a TOML file, ``VELA_*`` env.

Environment variables are ``VELA_<SECTION>_<FIELD>`` (``VELA_DATABASE_URL``,
``VELA_QUEUE_BACKEND``...). Lists accept comma-separated values. Secret fields
are :class:`pydantic.SecretStr`, so they never show in ``repr`` or logs, and
:func:`redacted` replaces them for ``vela config show``.
"""

from __future__ import annotations

import os
import secrets as _secrets
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vela.domain import DEFAULT_ROUTE, MAX_BACKLOG
from vela.errors import ConfigError

ENV_PREFIX = "VELA_"
REDACTED = "**redacted**"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(_Section):
    id: str = "vela-server"
    data_dir: Path = Path(".vela")
    # Encrypts the server's signing keys and secrets at rest. When unset, a
    # random key is created once in ``data_dir/master.key`` (mode 0600).
    master_key: SecretStr | None = None
    # Classic Vela's shared WORKER_SECRET, accepted from legacy workers on legacy routes
    # only (queue.mode / queue.legacy_routes); it can read every secret. Unused otherwise.
    worker_secret: SecretStr | None = None


class DatabaseSettings(_Section):
    # Empty means SQLite in ``server.data_dir/vela.db``.
    url: SecretStr | None = None
    echo: bool = False
    # PostgreSQL connections each server process keeps open (10 more may open under a
    # burst and close again). Below the Scheduler's concurrent work, connections churn.
    pool_size: int = Field(default=20, gt=0, le=500)


class QueueSettings(_Section):
    backend: Literal["database", "redis"] = "database"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    mode: Literal["server", "legacy"] = "server"
    routes: list[str] = Field(default_factory=lambda: [DEFAULT_ROUTE])
    # In server mode, routes still served by legacy (worker-pull) workers during a
    # migration; "legacy" mode means every route. See docs/migration.md.
    legacy_routes: list[str] = Field(default_factory=list)
    lease_seconds: float = Field(default=60.0, gt=0)
    max_item_bytes: int = Field(default=4096, gt=0)

    @field_validator("routes")
    @classmethod
    def _routes_nonempty(cls, v: list[str]) -> list[str]:
        if not v or any(not r.strip() for r in v):
            raise ValueError("routes must be a non-empty list of non-empty names")
        return v

    @model_validator(mode="after")
    def _legacy_routes_known(self) -> QueueSettings:
        unknown = [r for r in self.legacy_routes if r not in self.routes]
        if unknown:
            raise ValueError(f"legacy_routes names {', '.join(unknown)}, not in queue.routes")
        if self.mode == "legacy" and self.legacy_routes \
                and set(self.legacy_routes) != set(self.routes):
            raise ValueError('mode = "legacy" serves every route in legacy mode; for a mixed '
                             'fleet set mode = "server" and list the legacy routes in '
                             "legacy_routes")
        return self

    def legacy_route_names(self) -> tuple[str, ...]:
        """Routes whose workers pop the queue themselves (classic Vela)."""
        if self.mode == "legacy":
            return tuple(self.routes)
        return tuple(r for r in self.routes if r in self.legacy_routes)

    def server_route_names(self) -> tuple[str, ...]:
        """Routes the server's QueueListener pops and pushes to queueless workers."""
        legacy = self.legacy_route_names()
        return tuple(r for r in self.routes if r not in legacy)


class RaySettings(_Section):
    # Empty starts a local Ray; otherwise "auto" or "host:port" of a cluster head.
    address: str = ""
    namespace: str = "vela"
    # Redis owns 6379 on our machines, which is also Ray's default head port.
    head_port: int = Field(default=6390, gt=0, lt=65536)
    dashboard_port: int = Field(default=8265, gt=0, lt=65536)


class ApiSettings(_Section):
    # The HTTP API (the vela-api actor, on the head node) listens here; 0.0.0.0 to serve
    # other hosts.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, gt=0, lt=65536)
    # What clients call; empty means http://<host>:<port> (127.0.0.1 for a wildcard host).
    url: str = ""
    # Default lifetime of API tokens (`vela login`, and the local admin login of `vela serve`).
    token_ttl_s: int = Field(default=30 * 24 * 3600, gt=0)
    # The CLI's credentials (API URL and token, mode 0600); empty: data_dir/credentials.json.
    credentials_file: Path | None = None

    def listen_url(self) -> str:
        """Where the API answers as seen from its own host (the Ray head)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # noqa: S104
        return f"http://{host}:{self.port}"

    def base_url(self) -> str:
        """What clients call."""
        return self.url.rstrip("/") if self.url else self.listen_url()


class SchedulerSettings(_Section):
    health_check_period_s: float = Field(default=2.0, gt=0)
    health_check_timeout_s: float = Field(default=5.0, gt=0)
    # A worker failing checks for this long is declared lost.
    worker_lost_after_s: float = Field(default=10.0, gt=0)
    challenge_ttl_s: float = Field(default=10.0, gt=0)
    # Builds the queue listener places at once (never more than the free slots).
    dispatch_batch: int = Field(default=16, gt=0, le=1000)
    # The listener's long poll: how long it waits for a free slot or new work before
    # looking at the queue anyway (for items queued by other processes).
    listener_wait_s: float = Field(default=1.0, gt=0, le=60)
    # Items the listener takes beyond the free slots; each waits in the Scheduler up to
    # prefetch_wait_s for a slot to free, then goes back to the head of its route. So
    # a slot that frees under load is refilled at once, without a listener round trip.
    prefetch: int = Field(default=4, ge=0, le=1000)
    prefetch_wait_s: float = Field(default=0.1, ge=0, le=10)


class TokenSettings(_Section):
    build_token_grace_s: int = Field(default=300, ge=0)
    registration_ttl_s: int = Field(default=3600, gt=0)
    proof_max_age_s: int = Field(default=30, gt=0)
    package_ttl_s: int = Field(default=60, gt=0)
    # How often each server process reloads the server keys from the database (so a
    # `vela keys rotate` reaches it without a restart), and the least time between two
    # reloads asked by signatures of unknown key ids (or, on a worker, two fetches of the
    # server's key set after a package of an unknown signer). A rotated-in key signs two
    # periods after the rotation: give `vela keys rotate` the servers' value.
    key_reload_s: float = Field(default=30.0, gt=0, le=3600)


class WorkerSettings(_Section):
    hostname: str = ""
    state_dir: Path = Path(".vela/worker")
    routes: list[str] = Field(default_factory=lambda: [DEFAULT_ROUTE])
    build_limit: int = Field(default=1, gt=0)
    # Packages held beyond build_limit, each started when a slot frees (hides the
    # dispatch round trips between short builds; a held build waits for a slot).
    backlog: int = Field(default=0, ge=0, le=MAX_BACKLOG)
    mode: Literal["queueless", "legacy"] = "queueless"
    registration_token: SecretStr | None = None
    # Legacy mode only: the shared WORKER_SECRET this worker presents to the server.
    worker_secret: SecretStr | None = None
    allow_unsandboxed: bool = False
    network: bool = True
    checkin_period_s: float = Field(default=15.0, gt=0)
    log_batch_lines: int = Field(default=100, gt=0)
    log_flush_s: float = Field(default=0.5, gt=0)


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)

    def database_url(self) -> str:
        if self.database.url is not None and self.database.url.get_secret_value():
            return self.database.url.get_secret_value()
        return f"sqlite+aiosqlite:///{(self.server.data_dir / 'vela.db').resolve()}"

    def credentials_path(self) -> Path:
        return self.api.credentials_file or self.server.data_dir / "credentials.json"

    def master_key(self) -> bytes:
        """The 32-byte master key; created once in the data directory if unset."""
        if self.server.master_key is not None:
            return _decode_key(self.server.master_key.get_secret_value(), "server.master_key")
        path = self.server.data_dir / "master.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(_secrets.token_hex(32))
        return _decode_key(path.read_text().strip(), str(path))


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{where}: the master key must be 64 hex characters (32 bytes)")
    return key


def _env_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for name, sub in model.model_fields.items():
            key = f"{ENV_PREFIX}{section}_{name}".upper()
            if key in environ:
                value: Any = environ[key]
                if get_origin(sub.annotation) is list or list in get_args(sub.annotation):
                    value = [v.strip() for v in value.split(",") if v.strip()]
                out.setdefault(section, {})[name] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    return merged


def _describe(err: ValidationError, origin: dict[str, str]) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    # A whole-section check (e.g. queue.legacy_routes vs queue.routes) names its section.
    source = (origin.get(key) or origin.get(key.split(".")[0])
              or next((v for k, v in origin.items() if k.startswith(f"{key}.")), "defaults"))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {key}: {msg}"


def load_settings(path: str | Path | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """Load settings from defaults, the TOML file and the environment.

    ``path`` falls back to ``$VELA_CONFIG``. Relative paths are taken from the current
    directory and made absolute (:func:`absolute_paths`). Raises :class:`ConfigError`
    with the key and the file (or variable) at fault.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("VELA_CONFIG") or None
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path:
        p = _home_expanded(Path(path), "the configuration file")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: configuration file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{p} is a directory: give the path of a TOML file") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the configuration file: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p} is not UTF-8 text (at byte offset {e.start}): "
                              "save it as UTF-8, as TOML requires") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        for section, values in data.items():
            origin[section] = str(p)
            if isinstance(values, dict):
                for k in values:
                    origin[f"{section}.{k}"] = str(p)
    env = _env_overrides(environ)
    for section, values in env.items():
        for k in values:
            origin[f"{section}.{k}"] = f"environment {ENV_PREFIX}{section.upper()}_{k.upper()}"
    try:
        settings = Settings.model_validate(_merge(data, env))
    except ValidationError as e:
        raise ConfigError(_describe(e, origin)) from None
    return absolute_paths(settings, Path.cwd())


def absolute_paths(settings: Settings, base: Path) -> Settings:
    """Make every relative path of ``settings`` absolute against ``base`` (the
    directory the command runs in), in place: every ``Path`` setting and a SQLite
    database URL. A leading ``~`` or ``~user`` is that home directory, as in a shell.
    Returns ``settings``.

    The actors get these settings and run in the Ray node's working directory, not
    ours: a relative path would name another database, master key or worker state
    there. Absolute paths are kept exactly as given."""
    for section in type(settings).model_fields:
        model = getattr(settings, section)
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, Path):
                value = _home_expanded(value, f"{section}.{name}")
                if not value.is_absolute():
                    value = base / value
                setattr(model, name, value)
    url = settings.database.url
    if url is not None and url.get_secret_value().startswith("sqlite"):
        settings.database.url = SecretStr(_absolute_sqlite_url(url.get_secret_value(), base))
    return settings


def _home_expanded(path: Path, what: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` replaced by that home directory."""
    try:
        return path.expanduser()
    except RuntimeError:  # no $HOME and no password entry, or no such user
        raise ConfigError(f"{what}: {path}: cannot find the home directory that "
                          f"{path.parts[0]} names; give an absolute path") from None


def _absolute_sqlite_url(url: str, base: Path) -> str:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - a bad URL fails later, where the database opens
        return url
    db = parsed.database or ""
    # In memory, or a "file:" URI (uri=true): nothing to resolve.
    if db in ("", ":memory:") or db.startswith("file:"):
        return url
    path = _home_expanded(Path(db), "database.url")
    if str(path) == db and path.is_absolute():
        return url
    return parsed.set(database=str(base / path)).render_as_string(hide_password=False)


def _mask_secret(value: SecretStr) -> str:
    """URLs shown as :func:`shown_url`; other secrets vanish (it hides what is no URL)."""
    return shown_url(value.get_secret_value())


def shown_url(text: str) -> str:
    """A URL as it may be shown: its scheme, user, host, port and path; the password and
    the whole query (drivers take ``?password=`` too) hidden. Split by hand, not parsed:
    drivers read a password up to its "@" even when it holds "/", "#" or "@", where a
    URL parser would take part of it for the host, port or path."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return REDACTED
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if any(c in user for c in "/#") or "?" in userinfo:
        # That "@" is in the path or query (a port looks like a password): which part
        # is secret is unclear.
        return REDACTED
    host, query, _ = host.partition("?")
    shown = host.partition("#")[0] + ("?***" if query else "")
    if at:
        shown = f"{user}{':***' if colon else ''}@{shown}"
    return f"{scheme}://{shown}"


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, with every secret replaced."""

    def walk(model: BaseModel) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                out[name] = walk(value)
            elif isinstance(value, SecretStr):
                out[name] = _mask_secret(value)
            elif isinstance(value, Path):
                out[name] = str(value)
            else:
                out[name] = value
        return out

    return walk(settings)
