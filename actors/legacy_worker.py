"""LegacyWorkerActor: one per legacy worker host, pinned to its Ray node.

A thin shell over :class:`vela.legacy.worker.LegacyWorker`: it opens the
queue itself (classic Vela: legacy workers hold queue credentials), says
hello to the LegacyGatewayActor with the shared worker secret and runs the
pull loop until drained or killed. Started by `vela worker` and `vela serve
--local-workers` when ``worker.mode = "legacy"``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import ray

from actors._ray import RayLegacyServer
from vela.config import Settings
from vela.executor import DEFAULT_HIDDEN_PATHS, choose_runtime
from vela.legacy.worker import LegacyWorker
from vela.queue import open_queue
from vela.worker.launch import launch_spec

log = logging.getLogger(__name__)


@ray.remote
class LegacyWorkerActor:
    def __init__(self, settings: Settings, *, hostname: str, routes: list[str],
                 build_limit: int, state_dir: str, worker_secret: str) -> None:
        self.hostname = hostname
        # What a later start of this worker compares with (actors/deploy.py).
        self._spec = launch_spec(settings, hostname=hostname, routes=routes,
                                 build_limit=build_limit, state_dir=state_dir)
        state = Path(state_dir)
        workspace = state / "workspaces"
        workspace.mkdir(parents=True, exist_ok=True)
        ws = settings.worker
        runtime = choose_runtime(allow_unsandboxed=ws.allow_unsandboxed, network=ws.network,
                                 hidden_paths=(*DEFAULT_HIDDEN_PATHS, state.resolve()))
        self.core = LegacyWorker(
            hostname=hostname, routes=list(routes), build_limit=build_limit, runtime=runtime,
            workspace_root=workspace, server=RayLegacyServer(settings.ray.namespace),
            queue=open_queue(settings), worker_secret=worker_secret,
            batch_lines=ws.log_batch_lines, flush_s=ws.log_flush_s,
            key_reload_s=settings.tokens.key_reload_s)
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop().create_task(self.core.run(self._stop))

    def __repr__(self) -> str:
        return (f"LegacyWorkerActor({self.hostname}, {len(self.core.running)}/"
                f"{self.core.build_limit} running)")

    async def wait_connected(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Block until the gateway accepted us (or the timeout); returns :meth:`status`.
        A refusal (wrong secret, a server-mode route) returns at once with the error."""
        try:
            await asyncio.wait_for(self.core.answered.wait(), timeout_s)
        except TimeoutError:
            pass
        return await self.status()

    async def status(self) -> dict[str, Any]:
        return {**self.core.status(), "registered": self.core.connected, "pid": os.getpid(),
                "sandbox": type(self.core.runtime).__name__, "spec": self._spec}

    async def cancel(self, build_id: int) -> bool:
        return self.core.cancel(build_id)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop popping, finish the running builds, exit."""
        self._stop.set()
        await self.core.drain(timeout_s)
        await self._loop
        await self.core.queue.close()
        ray.actor.exit_actor()
