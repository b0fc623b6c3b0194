"""Open the configured queue back end."""

from __future__ import annotations

import time

from sqlalchemy.ext.asyncio import AsyncEngine

from vela.config import Settings
from vela.queue.base import Clock, Queue


def open_queue(settings: Settings, *, engine: AsyncEngine | None = None,
               clock: Clock = time.time, redis_prefix: str | None = None) -> Queue:
    """The back end named by ``settings.queue.backend``; each loads its client library
    only when chosen.

    The database back end uses ``engine`` if given (and leaves it open on
    ``close``), otherwise it creates one from ``settings.database_url()`` and
    disposes of it on ``close``. No connection is made until first use. The Redis
    back end keys its lists under ``redis_prefix`` (default ``vela:queue``).
    """
    if settings.queue.backend == "redis":
        from vela.queue.redis_queue import DEFAULT_PREFIX, RedisQueue

        return RedisQueue.from_url(settings.queue.redis_url.get_secret_value(),
                                   prefix=redis_prefix or DEFAULT_PREFIX, clock=clock)
    from vela.db.engine import engine_from
    from vela.queue.db_queue import DatabaseQueue

    if engine is not None:
        return DatabaseQueue(engine, clock=clock)
    return DatabaseQueue(engine_from(settings), owns_engine=True, clock=clock)
