"""The database back end (the embedded default), on SQLite and PostgreSQL.

One row per item in ``queue_items``; ``state`` is ready, leased or dead.
Every transition is a single conditional statement, so it is atomic on both
databases and a stale lease matches no row:

- reserve: ``UPDATE ... WHERE id = (SELECT id ... ORDER BY id LIMIT 1
  FOR UPDATE SKIP LOCKED) AND state = 'ready' RETURNING ...``. PostgreSQL
  skips rows other consumers hold; SQLite ignores the locking clause and
  serialises writers, which makes the single statement just as safe.
- ack / release / dead-letter: ``... WHERE id = ? AND state = 'leased' AND
  lease_id = ?``; a zero row count means the lease is no longer current.

Order within a route is by id: an item that comes back keeps its id and so
goes before everything pushed after it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from vela.db.engine import database, rowcount, shaped
from vela.db.models import QueueItem as QueueRow
from vela.errors import NotFound
from vela.queue.base import (
    Clock,
    DeadLetter,
    Queue,
    Reservation,
    RouteDepth,
    Settlement,
    Sleep,
    check_push,
    check_settlements,
    clip_reason,
)

READY, LEASED, DEAD = "ready", "leased", "dead"

t = cast(Table, QueueRow.__table__)
# The item a reservation holds, while it still holds it (parameters: _settling()).
_HELD = (t.c.id == bindparam("_id"), t.c.state == LEASED, t.c.lease_id == bindparam("_lease_id"))


def _int_id(item_id: str) -> int | None:
    text = str(item_id).strip()
    return int(text) if text.isdigit() else None


class DatabaseQueue(Queue):
    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = False,
                 clock: Clock = time.time, poll_interval_s: float = 0.2,
                 sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(clock=clock, poll_interval_s=poll_interval_s, sleep=sleep)
        self._engine = engine
        self._db = database(engine)
        self._owns = owns_engine

    async def _push(self, route: str, payload: bytes) -> str:
        return await self._db.write(lambda s: self._insert(s, route, payload))

    def pusher_within(self, engine: object) -> Callable[[Session, str, bytes], str] | None:
        if engine is not self._engine:
            return None
        return lambda s, route, payload: self._insert(s, *check_push(route, payload))

    def _insert(self, s: Session, route: str, payload: bytes) -> str:
        return str(s.execute(insert(t).values(
            route=route, payload=payload, state=READY, deliveries=0,
            created_at=self._clock()).returning(t.c.id)).scalar_one())

    async def _reserve_batch(self, routes: list[str], lease_s: float,
                             n: int) -> list[Reservation]:
        """Up to ``n`` items in one transaction. One statement per item and route keeps
        each lookup on the route index and gives routes their priority order."""
        stmt = shaped(("queue_reserve",), _reserve_statement)

        def unit(s: Session) -> list[Reservation]:
            out: list[Reservation] = []
            for route in routes:
                while len(out) < n:
                    lease_id, deadline = uuid.uuid4().hex, self._clock() + lease_s
                    row = s.execute(stmt, {"_route": route, "_lease_id": lease_id,
                                           "_until": deadline}).first()
                    if row is None:
                        break
                    out.append(Reservation(
                        id=str(row.id), route=route, payload=bytes(row.payload),
                        lease_id=lease_id, deadline=deadline, deliveries=int(row.deliveries)))
            return out

        return await self._db.write(unit)

    async def _changed(self, stmt: Any, params: dict[str, object] | None = None) -> int:
        """Rows one write statement changed, in its own transaction."""
        return await self._db.write(lambda s: rowcount(s.execute(stmt, params)))

    async def ack(self, res: Reservation) -> bool:
        return (await self.settle_many([Settlement(res, "ack")]))[0]

    async def release(self, res: Reservation) -> bool:
        return (await self.settle_many([Settlement(res, "release")]))[0]

    async def dead_letter(self, res: Reservation, reason: str, detail: str = "") -> bool:
        return (await self.settle_many([Settlement(res, "dead", reason, detail)]))[0]

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[bool]:
        """All of them in one transaction."""
        check_settlements(settlements)
        todo = [self._settling(x) for x in settlements]
        return await self._db.write(
            lambda s: [rowcount(s.execute(stmt, params)) == 1 for stmt, params in todo])

    def _settling(self, x: Settlement) -> tuple[Any, dict[str, object]]:
        """The statement that settles ``x`` while its lease is current, and its parameters."""
        held: dict[str, object] = {"_id": int(x.res.id), "_lease_id": x.res.lease_id}
        if x.action == "ack":
            return shaped(("queue_ack",), lambda: delete(t).where(*_HELD)), held
        if x.action == "release":
            return shaped(("queue_release",), lambda: update(t).where(*_HELD).values(
                state=READY, lease_id=None, lease_until=None,
                deliveries=t.c.deliveries - 1)), held
        if x.action == "dead":
            reason, detail = clip_reason(x.reason, x.detail)
            return shaped(("queue_dead",), lambda: update(t).where(*_HELD).values(
                state=DEAD, lease_id=None, lease_until=None, reason=bindparam("_reason"),
                detail=bindparam("_detail"), dead_at=bindparam("_at"))), {
                    **held, "_reason": reason, "_detail": detail, "_at": self._clock()}
        raise AssertionError(x.action)  # check_settlements refused it

    async def reclaim_expired(self, now: float | None = None) -> int:
        now = self._now(now)
        return await self._changed(
            update(t).where(t.c.state == LEASED, t.c.lease_until <= now)
            .values(state=READY, lease_id=None, lease_until=None)
        )

    async def depth(self) -> dict[str, RouteDepth]:
        rows = await self._db.read(lambda s: s.execute(
            select(t.c.route, t.c.state, func.count()).group_by(t.c.route, t.c.state)
        ).all())
        counts: dict[str, dict[str, int]] = {}
        for route, state, n in rows:
            counts.setdefault(route, {})[state] = int(n)
        return {
            route: RouteDepth(ready=c.get(READY, 0), in_flight=c.get(LEASED, 0),
                              dead=c.get(DEAD, 0))
            for route, c in sorted(counts.items())
        }

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        rows = await self._db.read(lambda s: s.execute(
            select(t).where(t.c.state == DEAD)
            .order_by(t.c.dead_at.desc(), t.c.id.desc()).limit(limit)
        ).all())
        return [
            DeadLetter(id=str(r.id), route=r.route, payload=bytes(r.payload),
                       reason=r.reason or "", detail=r.detail or "", dead_at=float(r.dead_at or 0),
                       created_at=float(r.created_at), deliveries=int(r.deliveries))
            for r in rows
        ]

    async def requeue(self, dead_id: str) -> str:
        old = _int_id(dead_id)
        if old is None:
            raise NotFound(f"no dead letter with id {dead_id!r}")
        missing = NotFound(f"no dead letter with id {dead_id!r}")

        def unit(s: Session) -> int:
            row = s.execute(
                select(t.c.route, t.c.payload).where(t.c.id == old, t.c.state == DEAD)
                .with_for_update()
            ).first()
            if row is None:
                raise missing
            # Insert before deleting: SQLite reuses the highest rowid once it is freed.
            new_id = s.execute(
                insert(t).values(route=row.route, payload=row.payload, state=READY,
                                 deliveries=0, created_at=self._clock()).returning(t.c.id)
            ).scalar_one()
            gone = s.execute(delete(t).where(t.c.id == old, t.c.state == DEAD))
            if rowcount(gone) != 1:
                raise missing  # requeued concurrently; rolls back our insert
            return int(new_id)

        return str(await self._db.write(unit))

    async def close(self) -> None:
        if self._owns:
            await self._engine.dispose()


def _reserve_statement() -> Any:
    """Lease the oldest ready item of one route, in one statement (see the module)."""
    head = (
        select(t.c.id)
        .where(t.c.state == READY, t.c.route == bindparam("_route"))
        .order_by(t.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(t)
        .where(t.c.id == head, t.c.state == READY)
        .values(state=LEASED, lease_id=bindparam("_lease_id"),
                lease_until=bindparam("_until"), deliveries=t.c.deliveries + 1)
        .returning(t.c.id, t.c.payload, t.c.deliveries)
    )
