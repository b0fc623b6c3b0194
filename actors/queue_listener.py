"""QueueListener actor: the long-lived loop that feeds the Scheduler.

It starts its loop on construction, so a restart by Ray resumes listening
with nobody having to call it; :meth:`status` reports health for the CLI
and dashboard.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors._metrics import RayMetrics
from actors._ray import SCHEDULER, RayDispatcher, get_actor
from actors._started import StartedWith
from vela.config import Settings
from vela.queue.listener import Listener
from vela.server.context import ServerContext

log = logging.getLogger(__name__)
DEPTH_PERIOD_S = 5.0


@ray.remote
class QueueListenerActor(StartedWith):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._listener: Listener | None = None
        self._starting = "starting"  # why it has not started yet, for status()
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def __repr__(self) -> str:
        return f"QueueListener({self._settings.queue.backend})"

    async def _run(self) -> None:
        delay = 0.2
        while self._listener is None and not self._stop.is_set():
            try:
                handle = get_actor(SCHEDULER, self._settings.ray.namespace)
                if handle is None:
                    raise RuntimeError("the Scheduler actor is not running yet")
                ctx = ServerContext.open(self._settings)
                self._listener = await ctx.listener(ctx.queue(), RayDispatcher(handle))
            except Exception as e:  # noqa: BLE001 - keep trying; status() says why
                self._starting = f"cannot start yet: {type(e).__name__}: {e}"
                log.warning("queue listener %s", self._starting)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self._listener is not None:
            gauges = asyncio.get_running_loop().create_task(self._depth_loop(self._listener))
            try:
                await self._listener.run_forever(self._stop)
            finally:
                gauges.cancel()

    async def _depth_loop(self, listener: Listener) -> None:
        """Queue depth per route for the dashboard."""
        metrics = RayMetrics()
        while True:
            try:
                depth = await listener.queue.depth()
                metrics.queue_depth({route: d.ready for route, d in depth.items()})
            except Exception as e:  # noqa: BLE001 - the listener reports back-end health
                log.debug("queue depth unavailable: %s", e)
            await asyncio.sleep(DEPTH_PERIOD_S)

    async def status(self) -> dict[str, Any]:
        if self._listener is None:
            return {"healthy": False, "last_error": self._starting}
        return self._listener.status()

    async def stop(self) -> None:
        self._stop.set()
        await self._task
