"""Every Ray call of the actors sits here, behind small clients with plain
interfaces, so the logic in ``vela/`` never sees Ray and tests can swap these.

Error translation, in one place: an actor that is dead for good
(``RayActorError``) becomes :class:`~vela.errors.WorkerGone`; one
that is restarting or unreachable (``ActorUnavailableError``) becomes a
``TimeoutError`` (transient). Application errors (e.g.
:class:`~vela.security.Rejected`) come through as themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from vela.coalesce import BatchingAuthority, Coalescer, call_counts
from vela.errors import WorkerGone

if TYPE_CHECKING:  # the server's types; a worker process never imports SQLAlchemy or redis
    from vela.queue.item import QueueItem
    from vela.queue.listener import Capacity, SubmitResult

T = TypeVar("T")

NAMESPACE = "vela"
AUTHORITY = "vela-token-authority"
SCHEDULER = "vela-scheduler"
LISTENER = "vela-queue-listener"
API = "vela-api"
WORKER_PREFIX = "vela-worker-"
# Legacy queue mode only (vela/legacy): classic Vela's worker API and pull workers.
LEGACY_GATEWAY = "vela-legacy-gateway"
LEGACY_WORKER_PREFIX = "vela-legacy-worker-"


def worker_actor_name(hostname: str) -> str:
    return WORKER_PREFIX + hostname


def legacy_worker_actor_name(hostname: str) -> str:
    return LEGACY_WORKER_PREFIX + hostname


def get_actor(name: str, namespace: str = NAMESPACE) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def actor_error_cause(e: RayActorError) -> str:
    """Why an actor died, in one line: its constructor's own error where Ray kept it
    (a VelaError says what to do), else the last line of Ray's message."""
    text = str(getattr(e, "error_msg", "") or e)
    for line in reversed(text.splitlines()):
        if "VelaError:" in line:
            return line.split("VelaError:", 1)[1].strip()
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


async def _await(ref: Awaitable[T], *, gone: type[Exception] | None = None) -> T:
    try:
        return await ref
    except ActorUnavailableError as e:
        raise TimeoutError(f"actor unavailable: {type(e).__name__}") from None
    except RayActorError as e:
        if gone is None:
            raise TimeoutError(f"actor died: {type(e).__name__}") from None
        raise gone(type(e).__name__) from None


class RayWorkerClient:
    """The Scheduler's line to one worker. Challenges and packages sent to it at the
    same moment (a listener pass placing several builds on its slots) travel in one
    call each; every build keeps its own challenge, token and sealed package."""

    def __init__(self, handle: Any) -> None:
        self._h = handle
        self._answers: Coalescer[dict[str, Any], dict[str, Any]] = Coalescer(
            lambda batch: _await(handle.availability_many.remote(batch), gone=WorkerGone))
        self._receipts: Coalescer[dict[str, Any], dict[str, Any]] = Coalescer(
            lambda batch: _await(handle.execute_packages.remote(batch), gone=WorkerGone))

    def call_counts(self) -> dict[str, dict[str, int]]:
        return call_counts(availability_many=self._answers, execute_packages=self._receipts)

    async def availability(self, challenge: dict[str, Any]) -> dict[str, Any]:
        return await self._answers.call(challenge)

    async def execute_package(self, package: dict[str, Any]) -> dict[str, Any]:
        return await self._receipts.call(package)

    async def status(self) -> dict[str, Any]:
        return await _await(self._h.status.remote(), gone=WorkerGone)

    async def cancel(self, build_id: int) -> bool:
        return await _await(self._h.cancel.remote(build_id), gone=WorkerGone)

    async def start_report(self, build_id: int) -> dict[str, Any] | None:
        return await _await(self._h.start_report.remote(build_id), gone=WorkerGone)


class RayWorkerDirectory:
    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.namespace = namespace

    async def connect(self, hostname: str, actor_name: str | None) -> RayWorkerClient | None:
        handle = get_actor(actor_name or worker_actor_name(hostname), self.namespace)
        return RayWorkerClient(handle) if handle is not None else None


class RayAuthority(BatchingAuthority):
    """The Scheduler's view of the TokenAuthority actor."""

    def __init__(self, handle: Any) -> None:
        self._h = handle
        super().__init__(lambda batch: _await(handle.issue_packages.remote(batch)),
                         lambda batch: _await(handle.verify_many.remote(batch)))

    async def key_set(self) -> dict[str, Any]:
        return await _await(self._h.key_set.remote())

    async def registration_token(self, *, routes: list[str], hostname: str | None,
                                 ttl_s: int | None = None) -> str:
        return await _await(self._h.registration_token.remote(routes=routes,
                                                              hostname=hostname, ttl_s=ttl_s))

    async def mint_api_token(self, *, subject: str, scopes: list[str],
                             ttl_s: int) -> dict[str, Any]:
        return await _await(self._h.mint_api_token.remote(subject=subject, scopes=scopes,
                                                          ttl_s=ttl_s))


class RayDispatcher:
    """The listener's view of the Scheduler actor."""

    def __init__(self, handle: Any) -> None:
        self._h = handle

    async def capacity(self, wait_s: float = 0.0, seen_work: int | None = None) -> Capacity:
        return await _await(self._h.capacity.remote(wait_s, seen_work))

    async def submit_many(self, items: list[QueueItem]) -> list[SubmitResult | Exception]:
        return await _await(self._h.submit_many.remote(items))

    async def requeue_pending(self, build_ids: list[int]) -> int:
        return await _await(self._h.requeue_pending.remote(build_ids))


class RayServerLink:
    """A worker's line to the server: reports with build token and proof. The reports
    of its builds that are ready at the same moment travel in one call."""

    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.namespace = namespace
        self._scheduler: Any | None = None
        self._reports: Coalescer[dict[str, Any], None] = Coalescer(
            lambda batch: _await(self.scheduler().reports_many.remote(batch)))

    def scheduler(self) -> Any:
        # A handle stays valid across the Scheduler's restarts; look it up once.
        if self._scheduler is None:
            self._scheduler = get_actor(SCHEDULER, self.namespace)
            if self._scheduler is None:
                raise TimeoutError("the scheduler is not running")
        return self._scheduler

    async def send_reports(self, *, build_id: int, token: str, proof: str,
                           reports: list[dict[str, Any]]) -> None:
        await self._reports.call({"build_id": build_id, "token": token, "proof": proof,
                                  "reports": reports})

    def call_counts(self) -> dict[str, dict[str, int]]:
        return call_counts(reports_many=self._reports)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Registration and check-in calls on the Scheduler."""
        return await _await(getattr(self.scheduler(), method).remote(*args, **kwargs))


class RayLegacyServer:
    """A legacy worker's line to the LegacyGatewayActor (every call carries the shared
    worker secret); transient trouble is a TimeoutError, a refusal a Rejected."""

    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.namespace = namespace
        self._gateway: Any | None = None

    def gateway(self) -> Any:
        if self._gateway is None:
            self._gateway = get_actor(LEGACY_GATEWAY, self.namespace)
            if self._gateway is None:
                raise TimeoutError("the legacy gateway is not running (no legacy route on "
                                   "this server, or it is starting)")
        return self._gateway

    async def hello(self, *, worker_secret: str, hostname: str, routes: list[str],
                    unknown_kid: bool = False) -> dict[str, Any]:
        asked = {"unknown_kid": True} if unknown_kid else {}
        return await _await(self.gateway().hello.remote(
            worker_secret=worker_secret, hostname=hostname, routes=routes, **asked))

    async def claim(self, *, worker_secret: str, hostname: str,
                    build_id: int) -> dict[str, Any] | None:
        return await _await(self.gateway().claim.remote(
            worker_secret=worker_secret, hostname=hostname, build_id=build_id))

    async def secrets(self, *, worker_secret: str, repo: str,
                      names: list[str]) -> dict[str, str]:
        return await _await(self.gateway().secrets.remote(
            worker_secret=worker_secret, repo=repo, names=names))

    async def report(self, *, worker_secret: str, hostname: str, build_id: int, action: str,
                     payload: dict[str, Any]) -> None:
        await _await(self.gateway().report.remote(
            worker_secret=worker_secret, hostname=hostname, build_id=build_id, action=action,
            payload=payload))
