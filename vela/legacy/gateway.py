"""The legacy entry point: classic Vela's worker API, for routes in legacy queue mode.

In classic Vela a worker pops a build off the queue itself, then asks the
server for the build and its secrets, and reports status, steps and logs —
every call authenticated by one static, shared ``WORKER_SECRET``. This
gateway is that API, kept so fleets can move to server mode route by route
(``docs/migration.md``). It is a separate, opt-in door:

- it can only be built when some route is legacy (``queue.mode = "legacy"``
  or ``queue.legacy_routes``) and ``server.worker_secret`` is set; otherwise
  :class:`~vela.errors.ConfigError`, and `vela serve` starts no gateway actor;
- it never sees build tokens: server-mode requests go through
  :meth:`~vela.server.authority.Authority.authorize` and only there;
- it claims and takes reports only for builds on legacy routes.

What it deliberately keeps from classic Vela: :meth:`LegacyGateway.secrets`
hands **any** secret of **any** repo to whoever presents the worker secret.
That is the weakness server mode removes (``docs/security.md``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vela.config import Settings
from vela.db.models import Build
from vela.db.store import Store, split_repo
from vela.domain import BuildStatus
from vela.errors import Conflict, NotFound, VelaError
from vela.legacy.modes import check_legacy_routes, server_worker_secret
from vela.metrics import Metrics
from vela.security import BUILD_TOKEN_ACTIONS, Reason, Rejected
from vela.server.builds import build_meta
from vela.server.reports import ReportWriter

log = logging.getLogger(__name__)

MAX_HOSTNAME_CHARS = 250
MAX_SECRET_NAMES = 100


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _digest(text: object) -> bytes:
    raw = text.encode() if isinstance(text, str) else b""
    return hashlib.sha256(raw).digest()


def check_worker_secret(presented: object, expected_digest: bytes) -> None:
    """Classic Vela's one credential. Compared as digests in constant time, so neither
    the value nor its length leaks through timing; anything but a string is refused."""
    if not isinstance(presented, str) or not presented \
            or not hmac.compare_digest(_digest(presented), expected_digest):
        raise Rejected(Reason.WORKER_SECRET_INVALID)


def authorize_legacy_report(action: str, *, build: Build, hostname: str,
                            legacy_routes: Collection[str]) -> None:
    """What a worker-secret holder may report: the four reporting actions, on a build
    of a legacy route that is running on the worker that claimed it."""
    if action not in BUILD_TOKEN_ACTIONS:
        raise Rejected(Reason.FORBIDDEN_ACTION, f"{str(action)[:40]!r}")
    if build.route not in legacy_routes:
        raise Rejected(Reason.ROUTE_MODE_MISMATCH,
                       f"build {build.id} is on server-mode route {build.route}")
    status = BuildStatus(build.status)
    if status.terminal:
        raise Rejected(Reason.BUILD_ENDED, f"build {build.id} is {status}")
    if status is not BuildStatus.RUNNING or build.worker != hostname:
        raise Rejected(Reason.WRONG_WORKER, f"build {build.id} is not running on {hostname}")


def _hostname(hostname: object) -> str:
    if not isinstance(hostname, str) or not hostname.strip() \
            or len(hostname) > MAX_HOSTNAME_CHARS:
        raise Rejected(Reason.MALFORMED, "hostname")
    return hostname


def _build_id(build_id: object) -> int:
    if not isinstance(build_id, int) or isinstance(build_id, bool) or build_id < 1:
        raise Rejected(Reason.MALFORMED, "build id")
    return build_id


@dataclass
class GatewayStats:
    hellos: int = 0
    claimed: int = 0
    secret_reads: int = 0
    reports: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class LegacyGateway:
    def __init__(self, *, store: Store, settings: Settings,
                 queue_keys: Callable[[], Awaitable[Mapping[str, str]]],
                 reload_queue_keys: Callable[[], Awaitable[bool]] | None = None,
                 metrics: Metrics | None = None,
                 now: Callable[[], datetime] = _utcnow) -> None:
        # Raises ConfigError when legacy mode is off: then this door does not exist.
        self._secret_digest = _digest(server_worker_secret(settings))
        self.store = store
        self.settings = settings
        self.legacy_routes = frozenset(settings.queue.legacy_route_names())
        self.metrics = metrics or Metrics()
        self.writer = ReportWriter(store, metrics=self.metrics, now=now)
        self.stats = GatewayStats()
        self._queue_keys = queue_keys
        # Reloads them from the database, at most once per period (RingHolder).
        self._reload_queue_keys = reload_queue_keys
        self._now = now

    def __repr__(self) -> str:
        return f"LegacyGateway(routes={sorted(self.legacy_routes)})"

    def _refused(self, e: Rejected, what: str) -> Rejected:
        self.stats.rejected[e.reason.value] = self.stats.rejected.get(e.reason.value, 0) + 1
        self.metrics.rejected(e.reason.value)
        log.info("legacy %s refused: %s", what, e.reason.value)
        return e

    async def hello(self, *, worker_secret: str, hostname: str, routes: list[str],
                    unknown_kid: bool = False) -> dict[str, Any]:
        """A legacy worker starts: it learns the queue's verifying keys and lease, once
        its secret and its routes check out (all of them legacy). ``unknown_kid``: it
        met an item of a key it does not know, asking again: the keys are reloaded from
        the database first, as the listener does on an unknown kid (at most once per
        period), not only taken as cached (one failed reload would hide a rotated-in key
        until the next)."""
        try:
            check_worker_secret(worker_secret, self._secret_digest)
            hostname = _hostname(hostname)
            if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
                raise Rejected(Reason.MALFORMED, "routes")
            check_legacy_routes(routes, self.legacy_routes)
        except Rejected as e:
            raise self._refused(e, "hello") from None
        self.stats.hellos += 1
        log.info("legacy worker %s serves %s", hostname, ", ".join(routes))
        if unknown_kid is True and self._reload_queue_keys is not None:
            await self._reload_queue_keys()
        q = self.settings.queue
        return {"queue_keys": dict(await self._queue_keys()), "routes": list(routes),
                "max_item_bytes": q.max_item_bytes, "lease_s": q.lease_seconds}

    async def claim(self, *, worker_secret: str, hostname: str,
                    build_id: int) -> dict[str, Any] | None:
        """Take a pending build popped from a legacy route: it becomes ``running`` on
        ``hostname``. Returns what it runs (metadata and executable, no secrets), or None
        if the build is no longer pending (a redelivered item: ack it)."""
        try:
            check_worker_secret(worker_secret, self._secret_digest)
            hostname = _hostname(hostname)
            build_id = _build_id(build_id)
            try:
                build = await self.store.get_build(build_id)
            except NotFound:
                raise Rejected(Reason.WRONG_BUILD, f"no build {build_id}") from None
            if build.route not in self.legacy_routes:
                raise Rejected(Reason.ROUTE_MODE_MISMATCH,
                               f"build {build_id} is on server-mode route {build.route}")
        except Rejected as e:
            raise self._refused(e, "claim") from None
        if BuildStatus(build.status) is not BuildStatus.PENDING:
            return None
        try:
            build = await self.store.transition_build(
                build_id, BuildStatus.PENDING, BuildStatus.RUNNING, worker=hostname,
                token_jti=None, dispatched_at=self._now(), attempts=build.attempts + 1)
        except Conflict:
            return None
        repo = await self.store.repo_of(build)
        self.stats.claimed += 1
        if build.enqueued_at is not None:
            self.metrics.dispatched((self._now() - build.enqueued_at).total_seconds())
        log.info("legacy worker %s claimed build %d", hostname, build_id)
        return {"build_id": build.id, "build": build_meta(build, repo.full_name),
                "executable": build.executable}

    async def secrets(self, *, worker_secret: str, repo: str,
                      names: list[str]) -> dict[str, str]:
        """Classic Vela's secret read: the named secrets of ``repo`` — any repo, no
        build needed. The shared worker secret is all it takes."""
        try:
            check_worker_secret(worker_secret, self._secret_digest)
            if not isinstance(names, list) or len(names) > MAX_SECRET_NAMES \
                    or not all(isinstance(n, str) for n in names):
                raise Rejected(Reason.MALFORMED, "secret names")
            try:
                split_repo(repo)
            except (VelaError, TypeError, AttributeError):
                raise Rejected(Reason.MALFORMED, "repo") from None
        except Rejected as e:
            raise self._refused(e, "secret read") from None
        self.stats.secret_reads += 1
        values = await self.store.secrets_for_repo(repo, names)
        log.info("legacy secret read: %d of %d secret(s) of %s", len(values), len(names),
                 repo)
        return values

    async def report(self, *, worker_secret: str, hostname: str, build_id: int, action: str,
                     payload: dict[str, Any]) -> None:
        """A legacy worker's update on a build it claimed; written like any other."""
        try:
            check_worker_secret(worker_secret, self._secret_digest)
            hostname = _hostname(hostname)
            build_id = _build_id(build_id)
            try:
                build = await self.store.get_build(build_id)
            except NotFound:
                raise Rejected(Reason.WRONG_BUILD, f"no build {build_id}") from None
            authorize_legacy_report(action, build=build, hostname=hostname,
                                    legacy_routes=self.legacy_routes)
            if not isinstance(payload, dict):
                raise Rejected(Reason.MALFORMED, f"{action} payload")
            self.stats.reports += 1
            await self.writer.apply(build_id=build_id, hostname=hostname, action=action,
                                    payload=payload)
        except Rejected as e:
            raise self._refused(e, "report") from None
