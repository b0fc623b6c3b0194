"""The WorkerActor's check-in loop, off Ray: following the server's key set must not
hold the check-ins that keep the worker registered."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace

from actors.worker import WorkerActor
from vela.worker.server_keys import ServerKeys


class _Link:
    """A Scheduler whose key set call hangs; it forgets the worker (restarted) at the
    second check-in."""

    def __init__(self) -> None:
        self.checkins = 0

    async def call(self, method: str, *args: object) -> object:
        if method == "key_set":
            await asyncio.Event().wait()  # hangs
        assert method == "checkin"
        self.checkins += 1
        return self.checkins < 2


async def test_a_hanging_key_set_fetch_does_not_hold_the_check_ins(tmp_path):
    worker = object.__new__(WorkerActor.__ray_metadata__.modified_class)
    link = _Link()
    registered_again = asyncio.Event()

    async def register() -> None:
        registered_again.set()

    worker.hostname = "w1"
    worker._settings = SimpleNamespace(worker=SimpleNamespace(checkin_period_s=0.05))
    worker._link = link
    worker._register = register
    worker._registered = asyncio.Event()
    worker._registered.set()
    worker._answered = asyncio.Event()
    worker._error = None
    worker._following = None
    worker.core = SimpleNamespace(pin=lambda keys: None)
    worker._server_keys = ServerKeys(tmp_path, fetch=lambda: link.call("key_set"),
                                     period_s=60)
    worker._server_keys._refresh._loaded_at -= timedelta(seconds=60)  # a fetch is due
    loop = asyncio.get_running_loop().create_task(worker._checkin_loop())
    try:
        # The Scheduler forgot the worker: it registers again a check-in later, not
        # after the key set fetch gives up (a reload period, here a minute).
        await asyncio.wait_for(registered_again.wait(), 2)
    finally:
        loop.cancel()
