"""The legacy worker: classic Vela's pull loop on the shared build runner.

It pops items from its (legacy) routes itself, claims the build at the
server's :class:`~vela.legacy.gateway.LegacyGateway`, fetches the build's
secrets there and reports back, every call with the shared WORKER_SECRET.
Running the build is :class:`~vela.worker.core.BuildRunner`'s job, the same
code a queueless worker uses: same executor, same sandbox, same ordered
reports with retries. ``actors/legacy_worker.py`` is its Ray shell.

Delivery follows the listener's rule (``vela/queue/listener.py``): an item
leaves the queue only once the build is claimed (or no longer pending). A
worker that dies after claiming leaves its build ``running``, as in classic
Vela; server mode's worker watch is one of the reasons to migrate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from vela.domain import BuildStatus
from vela.executor import Runtime
from vela.pipeline import Executable, PipelineError
from vela.queue.base import Queue
from vela.queue.item import InvalidReason, ItemVerifier, QueueItem, QueueItemInvalid
from vela.queue.listener import Backoff
from vela.reloading import Reloading
from vela.security import BuildAction, Rejected
from vela.worker.core import BuildRunner, Job, _Run

log = logging.getLogger("vela.legacy.worker")

# FINISH reason when the server would not hand out the build's secrets.
SECRETS_UNAVAILABLE = "secrets_unavailable"  # noqa: S105 - a reason code


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LegacyServer(Protocol):
    """The server's legacy entry point as the worker sees it (LegacyGateway's methods);
    :class:`~vela.security.Rejected` for a refusal, anything else is transient."""

    async def hello(self, *, worker_secret: str, hostname: str, routes: list[str],
                    unknown_kid: bool = False) -> dict[str, Any]: ...

    async def claim(self, *, worker_secret: str, hostname: str,
                    build_id: int) -> dict[str, Any] | None: ...

    async def secrets(self, *, worker_secret: str, repo: str,
                      names: list[str]) -> dict[str, str]: ...

    async def report(self, *, worker_secret: str, hostname: str, build_id: int, action: str,
                     payload: dict[str, Any]) -> None: ...


class Poll(StrEnum):
    """What one pass of the pull loop did."""

    NO_SLOT = "no_slot"              # every slot busy: nothing popped
    IDLE = "idle"                    # nothing queued on our routes
    STARTED = "started"              # claimed and running
    SKIPPED = "skipped"              # the build was no longer pending: item acked
    RELEASED = "released"            # could not claim now: the item goes back
    DEAD_LETTERED = "dead_lettered"  # the item failed verification


class LegacyWorker(BuildRunner):
    def __init__(self, *, hostname: str, routes: list[str], build_limit: int,
                 runtime: Runtime, workspace_root: Path, server: LegacyServer, queue: Queue,
                 worker_secret: str, reserve_timeout_s: float = 1.0,
                 reclaim_every_s: float = 5.0, clock: Callable[[], datetime] = _utcnow,
                 batch_lines: int = 100, flush_s: float = 0.5, report_retry_s: float = 0.2,
                 report_deadline_s: float = 300.0, key_reload_s: float = 30.0) -> None:
        super().__init__(hostname=hostname, routes=routes, build_limit=build_limit,
                         runtime=runtime, workspace_root=workspace_root, clock=clock,
                         batch_lines=batch_lines, flush_s=flush_s,
                         report_retry_s=report_retry_s, report_deadline_s=report_deadline_s)
        self.queue = queue
        self._server = server
        self._secret = worker_secret
        self.reserve_timeout_s = reserve_timeout_s
        self.reclaim_every_s = reclaim_every_s
        self._verifier: ItemVerifier | None = None
        # The queue keys come with a hello, asked again once they are key_reload_s old (a
        # rotated-in key is published before it signs) and when an item names an unknown
        # kid (at most once per key_reload_s): then the gateway reloads them too.
        self._keys = Reloading(self.connect, None, period_s=key_reload_s, clock=clock,
                               what="queue keys",
                               load_on_demand=lambda: self.connect(unknown_kid=True))
        self._lease_s = 60.0
        self._next_reclaim = float("-inf")
        self.error: str | None = None
        # The reason code when the server refused us (not transient), else None.
        self.refused: str | None = None
        # Set once the server answered our hello, either way.
        self.answered = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._verifier is not None

    def status(self) -> dict[str, Any]:
        return {**super().status(), "mode": "legacy", "connected": self.connected,
                "error": self.error, "refused": self.refused}

    async def connect(self, *, unknown_kid: bool = False) -> None:
        """Say hello to the server: it checks the secret and that every route is a legacy
        one (:class:`Rejected` ``route_mode_mismatch`` otherwise), and tells us the queue
        keys to verify items with. ``unknown_kid``: an item named a key we do not know
        (the server then reloads its keys, at most once per period)."""
        asked = {"unknown_kid": True} if unknown_kid else {}
        answer = await self._server.hello(worker_secret=self._secret, hostname=self.hostname,
                                          routes=list(self.routes), **asked)
        self._verifier = ItemVerifier.from_public_keys(answer["queue_keys"], self.routes,
                                                       int(answer["max_item_bytes"]))
        self._lease_s = float(answer["lease_s"])
        self.error = self.refused = None
        self.answered.set()

    # -- the pull loop ---------------------------------------------------------------

    async def poll_once(self) -> Poll:
        """Pop one item if a slot is free, claim its build and start it."""
        if self._verifier is None:
            await self.connect()
        else:
            await self._keys.fresh()
        if self.free_slots <= 0:
            return Poll.NO_SLOT
        await self._maybe_reclaim()
        res = await self.queue.reserve(self.routes, lease_s=self._lease_s,
                                       timeout_s=self.reserve_timeout_s)
        if res is None:
            return Poll.IDLE
        try:
            item = await self._verify(res.payload, route=res.route)
        except QueueItemInvalid as e:
            log.warning("dead-lettering queue item %s on %s: %s", res.id, res.route, e)
            await self.queue.dead_letter(res, e.reason.value, str(e))
            return Poll.DEAD_LETTERED
        try:
            claim = await self._server.claim(worker_secret=self._secret,
                                             hostname=self.hostname, build_id=item.build_id)
        except Rejected:
            await self.queue.release(res)
            raise
        except Exception as e:  # noqa: BLE001 - the server is unreachable: try again later
            log.warning("cannot claim build %s (%s); releasing the item", item.build_id,
                        type(e).__name__)
            await self.queue.release(res)
            # Pop nothing more until the gateway answers a hello again: if it is gone for
            # good (the route moved to server mode), the server's listener owns the items.
            self._verifier = None
            return Poll.RELEASED
        # Claimed (or no longer pending): the item has done its job.
        await self.queue.ack(res)
        if claim is None:
            return Poll.SKIPPED
        job = Job(build_id=int(claim["build_id"]), build=dict(claim["build"]),
                  executable=str(claim["executable"]), secrets={})
        self._start(job)
        return Poll.STARTED

    async def _verify(self, payload: bytes, *, route: str) -> QueueItem:
        try:
            assert self._verifier is not None
            return self._verifier.verify(payload, route=route)
        except QueueItemInvalid as e:
            if e.reason is not InvalidReason.UNKNOWN_KID \
                    or not await self._keys.reload_on_demand():
                raise
        assert self._verifier is not None
        return self._verifier.verify(payload, route=route)

    async def run_until_idle(self, max_passes: int = 1_000) -> list[Poll]:
        """Burst mode for tests and tools: passes until nothing more happens."""
        polls = []
        for _ in range(max_passes):
            polls.append(await self.poll_once())
            if polls[-1] in (Poll.IDLE, Poll.NO_SLOT):
                break
        return polls

    async def run(self, stop: asyncio.Event, *, idle_s: float = 0.5) -> None:
        """Passes until ``stop`` is set; never dies on an error."""
        backoff = Backoff(base_s=0.2, cap_s=10.0)
        while not stop.is_set():
            pause = 0.0
            try:
                poll = await self.poll_once()
                if poll is Poll.RELEASED:
                    pause = backoff.next()
                else:
                    backoff.reset()
                    if poll is Poll.NO_SLOT or (poll is Poll.IDLE
                                                and self.reserve_timeout_s <= 0):
                        pause = idle_s
            except Rejected as e:
                # Not transient (wrong secret, a server-mode route): say so, retry slowly
                # in case an admin fixes the configuration.
                self.error, self.refused = str(e), e.reason.value
                self.answered.set()
                log.error("legacy worker %s refused by the server: %s", self.hostname, e)
                self._verifier = None
                pause = 10.0
            except Exception as e:  # noqa: BLE001 - queue or server (re)starting
                self.error = f"{type(e).__name__}: {e}"
                log.warning("legacy worker %s pass failed: %s", self.hostname, self.error)
                pause = backoff.next()
            if pause:
                try:
                    await asyncio.wait_for(stop.wait(), pause)
                except TimeoutError:
                    pass

    async def _maybe_reclaim(self) -> None:
        now = time.time()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.reclaim_every_s
            await self.queue.reclaim_expired()

    # -- one build -----------------------------------------------------------------------

    async def _execute(self, run: _Run,
                       job: Job) -> tuple[BuildStatus, str | None, str | None]:
        """Fetch the build's secrets (classic Vela: from the server, with the worker
        secret), then run it as any worker does."""
        try:
            names = Executable.from_json(job.executable).secret_names()
        except PipelineError:
            names = []  # the runner reports the executable as invalid
        if names:
            try:
                secrets = await self._server.secrets(
                    worker_secret=self._secret, repo=str(job.build.get("repo", "")),
                    names=names)
            except Exception as e:  # noqa: BLE001 - a refusal or the server is away
                log.warning("build %s: no secrets from the server (%s)", job.build_id,
                            type(e).__name__)
                return (BuildStatus.ERROR, SECRETS_UNAVAILABLE,
                        "the server did not hand out the build's secrets")
            job = dataclasses.replace(job, secrets=dict(secrets))
        return await super()._execute(run, job)

    async def _send(self, run: _Run, batch: list[tuple[BuildAction, dict[str, Any]]]
                    ) -> None:
        for action, payload in batch:  # the classic protocol: one report per call
            await self._server.report(worker_secret=self._secret, hostname=self.hostname,
                                      build_id=run.build_id, action=action.value,
                                      payload=payload)
