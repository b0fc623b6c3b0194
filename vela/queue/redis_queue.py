"""The Redis back end (production).

Key layout, everything under ``prefix`` (default ``vela:queue``)::

    {prefix}:seq                 string  item id counter (INCR)
    {prefix}:routes              set     every route ever pushed to
    {prefix}:ready:{route}       list    ids waiting, head = next out
    {prefix}:leased:{route}      zset    id -> lease deadline (epoch seconds)
    {prefix}:dead:{route}        zset    id -> dead-lettered at
    {prefix}:item:{id}           hash    route, payload, state (ready|leased|dead),
                                         deliveries, created_at, lease,
                                         reason, detail, dead_at

Every state change is one MULTI/EXEC transaction guarded by WATCH, so an item
is always in exactly one of the three structures and its lease record appears
in the same step that takes it off the ready list: a consumer crashing at any
point leaves either a ready item or a leased one that ``reclaim_expired``
brings back. Optimistic transactions (rather than Lua) keep the back end
working on fakeredis without a Lua runtime.

Lease deadlines come from the injected clock, not Redis's: consumers of one
queue must have roughly synchronised clocks (skew shortens or lengthens leases).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from vela.errors import NotFound
from vela.queue.base import (
    Clock,
    DeadLetter,
    Queue,
    QueueError,
    Reservation,
    RouteDepth,
    Sleep,
    clip_reason,
)

DEFAULT_PREFIX = "vela:queue"
# Optimistic transactions retry on conflict; beyond this something is badly wrong.
MAX_TXN_ATTEMPTS = 200

T = TypeVar("T")

READY, LEASED, DEAD = "ready", "leased", "dead"


def _s(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisQueue(Queue):
    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX, owns_client: bool = False,
                 clock: Clock = time.time, poll_interval_s: float = 0.1,
                 sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(clock=clock, poll_interval_s=poll_interval_s, sleep=sleep)
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
        if kwargs.get("decode_responses"):
            raise QueueError("the queue's Redis client must use decode_responses=False "
                             "(payloads are bytes)")
        self._r = client
        self._owns = owns_client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisQueue:
        # No command here blocks server-side, so a socket timeout only cuts off
        # a hung server, turning it into an error the listener backs off from.
        client = Redis.from_url(url, decode_responses=False, socket_connect_timeout=5,
                                socket_timeout=10)
        return cls(client, owns_client=True, **kwargs)

    # -- keys ----------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _item(self, item_id: str) -> str:
        return self._k("item", item_id)

    # -- transactions --------------------------------------------------------

    async def _watched(self, keys: list[str], body: Callable[[Pipeline], Awaitable[T]]) -> T:
        """Run ``body`` with ``keys`` watched, again from the top on conflict.

        ``body`` reads in immediate mode, then either returns (nothing to do)
        or calls ``pipe.multi()``, queues writes and executes them.
        """
        async with self._r.pipeline(transaction=True) as pipe:
            for _ in range(MAX_TXN_ATTEMPTS):
                try:
                    await pipe.watch(*keys)
                    return await body(pipe)
                except WatchError:
                    await pipe.reset()
        raise QueueError(f"gave up after {MAX_TXN_ATTEMPTS} conflicting transactions on {keys}")

    # -- operations ----------------------------------------------------------

    async def _push(self, route: str, payload: bytes) -> str:
        # A crash between INCR and EXEC only wastes an id.
        item_id = str(await self._r.incr(self._k("seq")))
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._item(item_id), mapping={
                "route": route, "payload": payload, "state": READY, "deliveries": 0,
                "created_at": repr(self._clock()),
            })
            pipe.rpush(self._k("ready", route), item_id)
            pipe.sadd(self._k("routes"), route)
            await pipe.execute()
        return item_id

    async def _reserve_once(self, routes: list[str], lease_s: float) -> Reservation | None:
        for route in routes:
            res = await self._reserve_route(route, lease_s)
            if res is not None:
                return res
        return None

    async def _reserve_route(self, route: str, lease_s: float) -> Reservation | None:
        ready = self._k("ready", route)
        while True:
            got = await self._watched([ready], lambda pipe: self._take_head(pipe, route, lease_s))
            if not isinstance(got, str):
                return got
            # An id without its item: only if someone deleted a hash by hand.
            await self._r.zrem(self._k("leased", route), got)
            await self._r.delete(self._item(got))

    async def _take_head(self, pipe: Pipeline, route: str,
                         lease_s: float) -> Reservation | str | None:
        ready = self._k("ready", route)
        head = _s(await pipe.lindex(ready, 0))
        if head is None:
            return None
        key, lease_id, deadline = self._item(head), uuid.uuid4().hex, self._clock() + lease_s
        pipe.multi()
        pipe.lpop(ready)
        pipe.hincrby(key, "deliveries", 1)
        pipe.hset(key, mapping={"state": LEASED, "lease": lease_id})
        pipe.zadd(self._k("leased", route), {head: deadline})
        pipe.hget(key, "payload")
        out = await pipe.execute()
        if out[-1] is None:
            return head
        return Reservation(id=head, route=route, payload=bytes(out[-1]), lease_id=lease_id,
                           deadline=deadline, deliveries=int(out[1]))

    async def _settle(self, res: Reservation,
                      write: Callable[[Pipeline, str, str], object]) -> bool:
        """Apply ``write`` if ``res`` still holds the current lease on its item."""
        key = self._item(res.id)

        async def body(pipe: Pipeline) -> bool:
            state, lease, route = (_s(v) for v in await pipe.hmget(key, "state", "lease", "route"))
            if state != LEASED or lease != res.lease_id or route is None:
                return False
            pipe.multi()
            pipe.zrem(self._k("leased", route), res.id)
            write(pipe, key, route)
            await pipe.execute()
            return True

        return await self._watched([key], body)

    async def ack(self, res: Reservation) -> bool:
        return await self._settle(res, lambda pipe, key, route: pipe.delete(key))

    async def release(self, res: Reservation) -> bool:
        def write(pipe: Pipeline, key: str, route: str) -> None:
            pipe.hset(key, "state", READY)
            pipe.hdel(key, "lease")
            pipe.hincrby(key, "deliveries", -1)
            pipe.lpush(self._k("ready", route), res.id)

        return await self._settle(res, write)

    async def dead_letter(self, res: Reservation, reason: str, detail: str = "") -> bool:
        reason, detail = clip_reason(reason, detail)
        now = self._clock()

        def write(pipe: Pipeline, key: str, route: str) -> None:
            pipe.hset(key, mapping={"state": DEAD, "reason": reason, "detail": detail,
                                    "dead_at": repr(now)})
            pipe.hdel(key, "lease")
            pipe.zadd(self._k("dead", route), {res.id: now})

        return await self._settle(res, write)

    async def reclaim_expired(self, now: float | None = None) -> int:
        now = self._now(now)
        count = 0
        for route in sorted(_s(r) or "" for r in await self._r.smembers(self._k("routes"))):
            leased = self._k("leased", route)
            expired: list[tuple[bytes, float]] = await self._r.zrangebyscore(
                leased, "-inf", now, withscores=True)  # type: ignore[assignment]
            # Latest deadline first, so the longest-waiting item ends at the head.
            for raw_id, _ in sorted(expired, key=lambda e: e[1], reverse=True):
                count += await self._reclaim_one(route, _s(raw_id) or "", now)
        return count

    async def _reclaim_one(self, route: str, item_id: str, now: float) -> int:
        key, leased = self._item(item_id), self._k("leased", route)

        async def body(pipe: Pipeline) -> int:
            state = _s(await pipe.hget(key, "state"))
            score = await pipe.zscore(leased, item_id)
            if score is None or (state == LEASED and score > now):
                return 0
            pipe.multi()
            pipe.zrem(leased, item_id)
            if state == LEASED:
                pipe.hset(key, "state", READY)
                pipe.hdel(key, "lease")
                pipe.lpush(self._k("ready", route), item_id)
            # else: a lease record without a leased item (hand-edited); just drop it.
            await pipe.execute()
            return 1 if state == LEASED else 0

        return await self._watched([key], body)

    async def depth(self) -> dict[str, RouteDepth]:
        routes = sorted(_s(r) or "" for r in await self._r.smembers(self._k("routes")))
        async with self._r.pipeline(transaction=False) as pipe:
            for route in routes:
                pipe.llen(self._k("ready", route))
                pipe.zcard(self._k("leased", route))
                pipe.zcard(self._k("dead", route))
            counts = await pipe.execute()
        out = {}
        for i, route in enumerate(routes):
            d = RouteDepth(*(int(c) for c in counts[3 * i:3 * i + 3]))
            if d.ready or d.in_flight or d.dead:
                out[route] = d
        return out

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        routes = [_s(r) or "" for r in await self._r.smembers(self._k("routes"))]
        newest: list[tuple[float, str]] = []
        for route in routes:
            scored: list[tuple[bytes, float]] = await self._r.zrevrange(
                self._k("dead", route), 0, limit - 1, withscores=True)  # type: ignore[assignment]
            newest.extend((float(score), _s(raw_id) or "") for raw_id, score in scored)
        newest.sort(key=lambda e: (e[0], int(e[1]) if e[1].isdigit() else 0), reverse=True)
        newest = newest[:limit]
        async with self._r.pipeline(transaction=False) as pipe:
            for _, item_id in newest:
                pipe.hgetall(self._item(item_id))
            hashes = await pipe.execute()
        out = []
        for (dead_at, item_id), h in zip(newest, hashes, strict=True):
            if not h:
                continue
            f = {_s(k): v for k, v in h.items()}
            out.append(DeadLetter(
                id=item_id, route=_s(f.get("route")) or "", payload=bytes(f.get("payload", b"")),
                reason=_s(f.get("reason")) or "", detail=_s(f.get("detail")) or "",
                dead_at=dead_at, created_at=float(_s(f.get("created_at")) or 0),
                deliveries=int(_s(f.get("deliveries")) or 0),
            ))
        return out

    async def requeue(self, dead_id: str) -> str:
        dead_id = str(dead_id).strip()
        if not dead_id.isdigit():
            raise NotFound(f"no dead letter with id {dead_id!r}")
        key = self._item(dead_id)

        async def body(pipe: Pipeline) -> str:
            state, route, payload = await pipe.hmget(key, "state", "route", "payload")
            route = _s(route)
            if _s(state) != DEAD or route is None or payload is None:
                raise NotFound(f"no dead letter with id {dead_id!r}")
            new_id = str(await pipe.incr(self._k("seq")))
            pipe.multi()
            pipe.zrem(self._k("dead", route), dead_id)
            pipe.delete(key)
            pipe.hset(self._item(new_id), mapping={
                "route": route, "payload": payload, "state": READY, "deliveries": 0,
                "created_at": repr(self._clock()),
            })
            pipe.rpush(self._k("ready", route), new_id)
            pipe.sadd(self._k("routes"), route)
            await pipe.execute()
            return new_id

        return await self._watched([key], body)

    async def epoch(self) -> str | None:
        info = await self._r.info("server")
        return str(info.get("run_id", "")) or None

    async def close(self) -> None:
        if self._owns:
            await self._r.aclose()
