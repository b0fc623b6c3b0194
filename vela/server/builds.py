"""Creating builds and putting them on the queue.

A build is stored ``pending`` with its compiled executable and a signed
reference to it is pushed. A queue in the same database (the embedded default)
takes the item in the build's own transaction. Otherwise the push follows the
commit and ``enqueued_at`` is set only once it succeeded, so a pending build
without it is one whose push failed: the Scheduler's watch loop pushes it again
(:meth:`BuildQueue.enqueue_pending`). A queue outage therefore never fails (or
loses) a build that is stored: it waits, ``pending``, until the queue is back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable
from datetime import UTC, datetime
from typing import Any

from vela.db.models import Build
from vela.db.store import StepSpec, Store
from vela.domain import DEFAULT_ROUTE, BuildStatus
from vela.errors import VelaError
from vela.pipeline import compile_pipeline
from vela.queue import Queue
from vela.queue.item import ItemSigner, QueueItem
from vela.queue.listener import is_transient
from vela.security.keys import RingHolder

log = logging.getLogger(__name__)

# The longest build timeout: a build token lives this long plus its grace, so a retired
# server key verifies at least that long (vela.server.keys).
MAX_BUILD_TIMEOUT_S = 7 * 24 * 3600


class BuildQueue:
    """The server's producer side of the queue: stores builds, pushes signed items."""

    def __init__(self, store: Store, queue: Queue, signer: ItemSigner,
                 routes: Iterable[str], *, keys: RingHolder | None = None) -> None:
        self.store = store
        self.queue = queue
        self.signer = signer
        # Where the signer's key comes from, followed across rotations; None: ``signer``
        # signs for ever.
        self.keys = keys
        self.routes = tuple(routes)
        # Told after each successful push (the Scheduler wakes the listener with it).
        self.on_enqueued: Callable[[], None] | None = None

    async def create(self, repo: str, pipeline: str, *, route: str = DEFAULT_ROUTE,
                     timeout_s: int | None = None) -> Build:
        """Compile ``pipeline`` (YAML), store the build and queue it.

        Raises :class:`~vela.pipeline.PipelineError` (with lines) for a bad
        pipeline and :class:`VelaError` for an unknown route.
        """
        self._check_route(route, f"unknown route {route!r}")
        if timeout_s is not None and not 0 < timeout_s <= MAX_BUILD_TIMEOUT_S:
            raise VelaError(f"a build's timeout is 1 to {MAX_BUILD_TIMEOUT_S} seconds "
                            "(7 days)")
        executable = compile_pipeline(pipeline)
        steps = [StepSpec(number=i, name=s.name, image=s.image or "")
                 for i, s in enumerate(executable.steps, start=1)]
        return await self._store_and_queue(repo, executable=executable.to_json(), steps=steps,
                                           route=route, timeout_s=timeout_s)

    async def restart(self, build_id: int) -> Build:
        """A new build of the same repo with ``build_id``'s executable (Vela's restart);
        the original stays as it is and becomes the new build's parent."""
        old = await self.store.get_build(build_id)
        self._check_route(old.route, f"build {build_id} ran on route {old.route!r}, which "
                                     "this server no longer queues on")
        repo = await self.store.repo_of(old)
        steps = [StepSpec(number=s.number, name=s.name, image=s.image)
                 for s in await self.store.get_steps(build_id)]
        return await self._store_and_queue(repo.full_name, executable=old.executable,
                                           steps=steps, route=old.route,
                                           timeout_s=old.timeout_s, parent_id=old.id)

    def _check_route(self, route: str, problem: str) -> None:
        if route not in self.routes:
            raise VelaError(f"{problem}; this server queues on: {', '.join(self.routes)} "
                            "(queue.routes)")

    async def _store_and_queue(self, repo: str, **fields: Any) -> Build:
        """Store a new build and queue it: in the same transaction when the queue lives
        in the same database (the embedded default: one commit, and no moment when the
        build exists unqueued), else by a push after the commit."""
        await self._fresh_signer()
        push = self.queue.pusher_within(self.store.engine)
        if push is None:
            build = await self.store.create_build(repo, **fields)
            await self.enqueue(build)
            return build
        build = await self.store.create_build(
            repo, enqueued_at=datetime.now(UTC), **fields,
            then=lambda s, b: push(s, b.route, self._signed(b)))
        self._enqueued()
        return build

    async def enqueue(self, build: Build) -> bool:
        """Push a signed item for ``build`` (again, after a requeue: attempt + 1).

        False if the queue back end is unreachable: the build is then marked
        unqueued (``enqueued_at`` cleared) for :meth:`enqueue_pending` to push later.
        """
        await self._fresh_signer()
        try:
            await self.queue.push(build.route, self._signed(build))
        except Exception as e:
            if not is_transient(e):
                raise
            log.warning("queue unreachable, build %s waits pending until it is back: %s",
                        build.id, type(e).__name__)
            if build.enqueued_at is not None:
                await self.store.set_build_fields(build.id, enqueued_at=None)
            return False
        if build.enqueued_at is None:
            await self.store.set_build_fields(build.id, enqueued_at=datetime.now(UTC))
        self._enqueued()
        return True

    async def _fresh_signer(self) -> None:
        """Sign with the queue key that signs now (after a rotation, the new one)."""
        if self.keys is not None:
            active = (await self.keys.current()).active
            if active.kid != self.signer.kid:
                self.signer = ItemSigner.from_key(active)

    def _signed(self, build: Build) -> bytes:
        return self.signer.sign(QueueItem.new(build.id, build.route,
                                              attempt=build.attempts + 1))

    def _enqueued(self) -> None:
        if self.on_enqueued is not None:
            self.on_enqueued()

    async def enqueue_pending(self, *, unqueued_only: bool,
                              skip: Container[int] = ()) -> tuple[int, bool]:
        """Push pending builds again — only those that have no queue item (their push
        failed: a crash or a queue outage) with ``unqueued_only`` — except ``skip``.
        Returns how many were pushed and whether all were (False: the queue went
        away meanwhile; the next call repeats it). A duplicate item is harmless:
        dispatch is a compare-and-set from ``pending``."""
        pushed = 0
        for build in await self.store.list_builds(status=[BuildStatus.PENDING],
                                                  unqueued=unqueued_only, limit=100_000):
            if build.id in skip:
                continue
            if not await self.enqueue(build):
                return pushed, False
            pushed += 1
        return pushed, True


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


async def build_view(store: Store, build_id: int, *, after_log_id: int = 0) -> dict[str, Any]:
    """A build, its steps and its log chunks after ``after_log_id``, as plain data."""
    build = await store.get_build(build_id)
    repo = await store.repo_of(build)
    steps = await store.get_steps(build_id)
    logs = await store.get_logs(build_id, after_id=after_log_id)
    return {
        "id": build.id, "repo": repo.full_name, "number": build.number, "route": build.route,
        "status": build.status, "reason": build.reason, "message": build.message,
        "worker": build.worker, "attempts": build.attempts,
        **{f"{k}_at": _iso(getattr(build, f"{k}_at"))
           for k in ("created", "enqueued", "dispatched", "started", "finished")},
        "steps": [{"number": s.number, "name": s.name, "status": s.status,
                   "exit_code": s.exit_code, "reason": s.reason,
                   "started_at": _iso(s.started_at), "finished_at": _iso(s.finished_at)}
                  for s in steps],
        "logs": [{"id": i, "step": n, "text": text} for i, n, text in logs],
    }


def build_meta(build: Build, repo_full_name: str) -> dict[str, Any]:
    """What a worker is told about the build it runs (its ``VELA_*`` variables), in
    either queue mode."""
    return {"build_id": build.id, "repo": repo_full_name, "build_number": build.number,
            "route": build.route, "timeout_s": build.timeout_s}
