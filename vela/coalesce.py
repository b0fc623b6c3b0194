"""Many concurrent calls to one actor method sent as one call.

Each actor call costs CPU in both processes whatever it carries (measured: about
as much as the token work it asks for), so where many requests go to the same
actor at once — the Scheduler's package and report checks to the TokenAuthority —
they travel together. :class:`Coalescer` sends one batch at a time: requests made
while a batch is in flight wait and go in the next, so an idle system sends each
request at once (one event-loop turn later) and a busy one sends them in batches
as large as the load makes them. Plain asyncio; the Ray call is the ``send``.
The receiving actor answers such a batch with :func:`answer_each`.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from vela.errors import Unavailable, VelaError
from vela.security.errors import Reason, Rejected

log = logging.getLogger(__name__)

T = TypeVar("T")
Req = TypeVar("Req")
Res = TypeVar("Res")

# The most requests one call carries; the receiving side refuses more.
MAX_BATCH = 64

# ``send`` answers each request, in order, with its result or the error to raise.
Send = Callable[[list[Req]], Awaitable[Sequence["Res | BaseException"]]]


class Coalescer(Generic[Req, Res]):
    def __init__(self, send: Send[Req, Res], *, max_batch: int = MAX_BATCH) -> None:
        self._send = send
        self.max_batch = max_batch
        self._pending: list[tuple[Req, asyncio.Future[Res]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0  # calls made, for tests and the curious
        self.requests = 0

    def __repr__(self) -> str:
        return f"Coalescer(pending={len(self._pending)}, batches={self.batches})"

    async def call(self, request: Req) -> Res:
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._drain(), name="vela-coalescer")
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[:self.max_batch]
            del self._pending[:len(batch)]
            batch = [(r, f) for r, f in batch if not f.done()]  # callers gone: not sent
            if not batch:
                continue
            self.batches += 1
            self.requests += len(batch)
            try:
                results = await self._send([r for r, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} answers to {len(batch)} requests")
            except asyncio.CancelledError:
                for _, f in batch + self._pending:
                    f.cancel()
                self._pending.clear()
                raise
            except Exception as e:  # noqa: BLE001 - the whole call failed: each caller sees it
                results = [e] * len(batch)
            for (_, f), r in zip(batch, results, strict=True):
                if f.done():
                    continue
                if isinstance(r, BaseException):
                    f.set_exception(r)
                else:
                    f.set_result(r)


def check_batch(requests: object) -> Sequence[Any]:
    """What a batch call takes: a list of at most :data:`MAX_BATCH` requests."""
    if not isinstance(requests, list | tuple) or len(requests) > MAX_BATCH:
        raise Rejected(Reason.MALFORMED, f"up to {MAX_BATCH} requests at a time")
    return requests


async def answer_each(requests: object, one: Callable[[Any], Awaitable[T]], *,
                      concurrently: bool = False) -> list[T | Exception]:
    """The receiving end of a coalesced call: each request answered on its own, a
    failure as its answer (its caller raises it), never the batch's. An answer
    crosses the wire as a value, so a failure that is not one of ours (a
    :class:`~vela.errors.VelaError`: a refusal, a conflict) goes as
    :class:`~vela.errors.Unavailable`, named by type only — a driver's error may hold
    what it was sent, or not pickle. Anything but a list of at most :data:`MAX_BATCH`
    requests is refused whole. ``concurrently`` when a request may wait on another's
    progress (a build's reports on its start)."""
    batch = check_batch(requests)

    async def answer(request: object) -> T | Exception:
        try:
            return await one(request)
        except VelaError as e:
            try:  # it must cross back whole: one that cannot would sink the batch's answer
                pickle.loads(pickle.dumps(e))  # noqa: S301 - our own object, just made
            except Exception:  # noqa: BLE001
                log.error("%s cannot be sent back whole; sending its text", type(e).__name__)
                return Unavailable(f"{type(e).__name__}: {e}")
            return e
        except Exception as e:  # noqa: BLE001 - answered to its own caller, not the batch
            log.warning("a request failed: %s; its caller may retry", type(e).__name__)
            return Unavailable(f"the request failed here ({type(e).__name__}); retry")

    if concurrently:
        return list(await asyncio.gather(*(answer(r) for r in batch)))
    return [await answer(r) for r in batch]


def call_counts(**coalescers: Coalescer[Any, Any]) -> dict[str, dict[str, int]]:
    """Calls made and requests they carried, per coalesced method (for ``status``)."""
    return {name: {"calls": c.batches, "requests": c.requests}
            for name, c in coalescers.items()}


class BatchingAuthority:
    """The Scheduler's one-build calls to the TokenAuthority (``issue_package``,
    ``verify``) made through its batch calls (``issue_packages``, ``verify_many``):
    what concurrent dispatches and reports ask for at the same moment travels in one
    call."""

    def __init__(self, issue_packages: Send[tuple[int, str], Any],
                 verify_many: Send[dict[str, Any], Any]) -> None:
        self._packages: Coalescer[tuple[int, str], Any] = Coalescer(issue_packages)
        self._checks: Coalescer[dict[str, Any], Any] = Coalescer(verify_many)

    def call_counts(self) -> dict[str, dict[str, int]]:
        return call_counts(issue_packages=self._packages, verify_many=self._checks)

    async def issue_package(self, build_id: int, hostname: str) -> Any:
        """An ``IssuedPackage`` (vela.server.authority, not imported: workers import this)."""
        return await self._packages.call((build_id, hostname))

    async def verify(self, *, build_id: int, token: object, proof: object,
                     reports_digest: str, worker_sign_key: str | None = None) -> Any:
        """The token's ``BuildClaims`` (vela.security.tokens, not imported: see above)."""
        return await self._checks.call({"build_id": build_id, "token": token,
                                        "proof": proof, "reports_digest": reports_digest,
                                        "worker_sign_key": worker_sign_key})
