"""A value read from a slow source (the database, the server), kept and reloaded.

:class:`Reloading` reloads when its value is older than a period, and on demand — when
a signature names a key the value lacks — at most once per period: whoever can make
such requests (a forged key id costs nothing) cannot make it hammer the source. Calls
made while a load is under way share that load. A load that fails keeps the value it
had and is tried again a period later (the source may be down: no hammering either);
so does a load that has not answered after a period (at least
:data:`MIN_LOAD_TIMEOUT_S`): it is given up, so that it cannot hold its callers, nor
every later reload, for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# The least time a load is given before it counts as failed (a short period in tests).
MIN_LOAD_TIMEOUT_S = 5.0


class Reloading(Generic[T]):
    def __init__(self, load: Callable[[], Awaitable[T]], value: T, *, period_s: float,
                 clock: Callable[[], datetime], what: str = "value",
                 timeout_s: float | None = None,
                 load_on_demand: Callable[[], Awaitable[T]] | None = None) -> None:
        self._load = load
        # What an on-demand reload runs (default: ``load``): a source told why it is asked
        # may look further than its own cache.
        self._load_on_demand = load_on_demand or load
        self.value = value
        self.period = timedelta(seconds=period_s)
        self.timeout_s = max(period_s, MIN_LOAD_TIMEOUT_S) if timeout_s is None else timeout_s
        self._clock = clock
        self._what = what
        self._loaded_at = clock()
        self._asked_at: datetime | None = None  # the last on-demand reload
        self._loading: asyncio.Task[bool] | None = None
        self.loads = 0  # loads begun, for status and tests

    def age(self) -> timedelta:
        return self._clock() - self._loaded_at

    async def fresh(self) -> T:
        """The value, reloaded first if it is a period old or older."""
        if self._loading is not None or self.age() >= self.period:
            await self._reload(self._load)
        return self.value

    async def reload_on_demand(self) -> bool:
        """Reload now, unless an on-demand reload began less than a period ago: then
        False at once (the caller refuses as it would have). Otherwise whether the
        reload — this one, or one under way — succeeded (False: the old value stays)."""
        if self._loading is None:
            now = self._clock()
            if self._asked_at is not None and now - self._asked_at < self.period:
                return False
            self._asked_at = now
        return await self._reload(self._load_on_demand)

    async def _reload(self, load: Callable[[], Awaitable[T]]) -> bool:
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load_once(load))
        # Shielded: a caller that gives up does not cancel the others' load.
        return await asyncio.shield(self._loading)

    async def _load_once(self, load: Callable[[], Awaitable[T]]) -> bool:
        self.loads += 1
        try:
            value = await asyncio.wait_for(load(), self.timeout_s)
        except Exception as e:  # noqa: BLE001 - keep what we have; retried a period later
            log.warning("cannot reload the %s (%s: %s); keeping the one loaded %.0f s ago",
                        self._what, type(e).__name__, e or "no answer",
                        self.age().total_seconds())
            ok = False
        else:
            self.value = value
            ok = True
        finally:
            self._loaded_at = self._clock()
            self._loading = None
        return ok
