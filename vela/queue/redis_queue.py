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
working on fakeredis without a Lua runtime. A listener pass takes its items
from a route's head in one transaction and settles them in one: a round trip
to read, one to write, whatever their number.

Lease deadlines come from the injected clock, not Redis's: consumers of one
queue must have roughly synchronised clocks (skew shortens or lengthens leases).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
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
    Settlement,
    Sleep,
    check_settlements,
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

    async def _reserve_batch(self, routes: list[str], lease_s: float,
                             n: int) -> list[Reservation]:
        """Up to ``n`` items, each route's share taken off its head in one transaction.
        Items taken when an error strikes are returned (the error comes again)."""
        out: list[Reservation] = []
        for route in routes:
            while len(out) < n:
                try:
                    got = await self._reserve_route(route, lease_s, n - len(out))
                except Exception:
                    if not out:
                        raise
                    return out
                if not got:
                    break
                out.extend(got)
        return out

    async def _reserve_route(self, route: str, lease_s: float,
                             n: int) -> list[Reservation]:
        """Up to ``n`` items off the head of ``route``; empty if it has none. Ids whose
        item is gone (only if someone deleted a hash by hand) are dropped, so fewer
        than ``n`` may come back from a route that has more."""
        ready = self._k("ready", route)
        got, orphans = await self._watched(
            [ready], lambda pipe: self._take_heads(pipe, route, lease_s, n))
        if orphans:
            await self._r.zrem(self._k("leased", route), *orphans)
            await self._r.delete(*(self._item(i) for i in orphans))
        return got

    async def _take_heads(self, pipe: Pipeline, route: str, lease_s: float,
                          n: int) -> tuple[list[Reservation], list[str]]:
        ready = self._k("ready", route)
        heads = [_s(raw) or "" for raw in await pipe.lrange(ready, 0, n - 1)]
        if not heads:
            return [], []
        deadline = self._clock() + lease_s
        leases = [uuid.uuid4().hex for _ in heads]
        pipe.multi()
        pipe.ltrim(ready, len(heads), -1)
        for item_id, lease_id in zip(heads, leases, strict=True):
            key = self._item(item_id)
            pipe.hincrby(key, "deliveries", 1)
            pipe.hset(key, mapping={"state": LEASED, "lease": lease_id})
            pipe.hget(key, "payload")
        pipe.zadd(self._k("leased", route), dict.fromkeys(heads, deadline))
        out = await pipe.execute()
        got: list[Reservation] = []
        orphans: list[str] = []
        for i, (item_id, lease_id) in enumerate(zip(heads, leases, strict=True)):
            deliveries, payload = out[1 + 3 * i], out[3 + 3 * i]
            if payload is None:
                orphans.append(item_id)
                continue
            got.append(Reservation(id=item_id, route=route, payload=bytes(payload),
                                   lease_id=lease_id, deadline=deadline,
                                   deliveries=int(deliveries)))
        return got, orphans

    async def ack(self, res: Reservation) -> bool:
        return (await self.settle_many([Settlement(res, "ack")]))[0]

    async def release(self, res: Reservation) -> bool:
        return (await self.settle_many([Settlement(res, "release")]))[0]

    async def dead_letter(self, res: Reservation, reason: str, detail: str = "") -> bool:
        return (await self.settle_many([Settlement(res, "dead", reason, detail)]))[0]

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[bool]:
        """Settle every reservation whose lease is still current in one transaction
        (their items watched, their states read in one round trip); items released
        together go back to the head of their route in the order given."""
        check_settlements(settlements)
        if not settlements:
            return []
        keys = list(dict.fromkeys(self._item(x.res.id) for x in settlements))

        async def body(pipe: Pipeline) -> list[bool]:
            async with self._r.pipeline(transaction=False) as read:
                for x in settlements:
                    read.hmget(self._item(x.res.id), "state", "lease", "route")
                states = await read.execute()
            current: list[bool] = []
            routes: list[str] = []
            seen: set[str] = set()
            for x, values in zip(settlements, states, strict=True):
                state, lease, route = (_s(v) for v in values)
                # An item given twice is settled once, as two calls in a row would.
                current.append(state == LEASED and lease == x.res.lease_id
                               and route is not None and x.res.id not in seen)
                seen.add(x.res.id)
                routes.append(route or "")
            if not any(current):
                return current
            pipe.multi()
            now = self._clock()
            for x, ok, route in zip(settlements, current, routes, strict=True):
                if ok and x.action != "release":
                    self._write_settled(pipe, x, route, now)
            for x, ok, route in reversed(list(zip(settlements, current, routes,
                                                   strict=True))):
                if ok and x.action == "release":  # the last first: the first ends at the head
                    self._write_settled(pipe, x, route, now)
            await pipe.execute()
            return current

        # Watched before they are read: a change by anyone in between aborts the write.
        return await self._watched(keys, body)

    def _write_settled(self, pipe: Pipeline, x: Settlement, route: str, now: float) -> None:
        key = self._item(x.res.id)
        pipe.zrem(self._k("leased", route), x.res.id)
        if x.action == "ack":
            pipe.delete(key)
        elif x.action == "release":
            pipe.hset(key, "state", READY)
            pipe.hdel(key, "lease")
            pipe.hincrby(key, "deliveries", -1)
            pipe.lpush(self._k("ready", route), x.res.id)
        else:
            reason, detail = clip_reason(x.reason, x.detail)
            pipe.hset(key, mapping={"state": DEAD, "reason": reason, "detail": detail,
                                    "dead_at": repr(now)})
            pipe.hdel(key, "lease")
            pipe.zadd(self._k("dead", route), {x.res.id: now})

    async def reclaim_expired(self, now: float | None = None) -> int:
        now = self._now(now)
        count = 0
        for route in sorted(_s(r) or "" for r in await self._r.smembers(self._k("routes"))):
            leased = self._k("leased", route)
            expired: list[tuple[bytes, float]] = await self._r.zrangebyscore(
                leased, "-inf", now, withscores=True)  # type: ignore[assignment]
            # Latest deadline first, and within one (a pass leases its batch together)
            # the newest item first, so the longest-waiting item ends at the head.
            for raw_id, _ in sorted(expired, key=_newest_first, reverse=True):
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


def _newest_first(entry: tuple[bytes, float]) -> tuple[float, int]:
    """Sort key of a leased item: its deadline, then its id (ids count up from 1)."""
    raw_id, deadline = entry
    return deadline, int(raw_id) if raw_id.isdigit() else -1
