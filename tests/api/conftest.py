"""The API without Ray: the whole server (tests/server's in-process System: Authority,
Scheduler, Listener, a real sandboxed WorkerCore) runs in an event loop of its own
thread, with SQLite and the database queue, pumped in the background. Tests reach it
two ways:

- ``client``: FastAPI's TestClient over ``create_app(RemoteBackend(...))``, each
  backend operation forwarded into the server's loop (as the Ray deployment
  forwards them to the Scheduler actor);
- ``harness.url``: the same app served by uvicorn in the server's loop, for the
  CLI and for real HTTP streaming.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient

from vela.api import RemoteBackend, ServerBackend, create_app, dispatch
from vela.api.auth import ensure_admin_credential
from vela.config import Settings
from vela.db import migrate
from vela.db.engine import create_engine
from vela.db.store import Store
from vela.queue.db_queue import DatabaseQueue
from vela.security import mint_api_token
from vela.server.context import ServerContext

T = TypeVar("T")
WORKER = "api-w1"


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.settings = Settings.model_validate({
            "server": {"id": "vela-api-test", "data_dir": str(tmp)},
            "scheduler": {"health_check_period_s": 0.2, "health_check_timeout_s": 2.0,
                          "worker_lost_after_s": 5.0},
            "queue": {"routes": ["vela", "gpu"], "lease_seconds": 30},
        })
        self.loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self.credential = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="api-harness", daemon=True)

    # -- from the test thread --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            raise RuntimeError(f"API harness did not start: {self._error!r}")

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def remote(self) -> RemoteBackend:
        """The backend as the API in another loop sees it."""

        async def call(op: str, kwargs: dict[str, Any]) -> Any:
            assert self.loop is not None
            fut = asyncio.run_coroutine_threadsafe(dispatch(self.backend, op, kwargs),
                                                   self.loop)
            return await asyncio.wrap_future(fut)

        return RemoteBackend(call)

    def token(self, *scopes: str, ttl_s: int = 600, now: datetime | None = None,
              subject: str = "tester") -> str:
        token, _ = mint_api_token(self.system.authority.ring, issuer=self.settings.server.id,
                                  subject=subject, scopes=list(scopes), ttl_s=ttl_s,
                                  now=now or datetime.now(UTC))
        return token

    # -- in the server's thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        import uvicorn

        from tests.server.conftest import System

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        engine = create_engine(f"sqlite+aiosqlite:///{self.tmp / 'vela.db'}")
        await migrate.upgrade(engine)
        master_key = bytes(range(32))
        ctx = ServerContext(settings=self.settings, engine=engine,
                            store=Store(engine, master_key), master_key=master_key)
        self.system = System(settings=self.settings, ctx=ctx, tmp=self.tmp,
                             queue=DatabaseQueue(engine))
        await self.system.start()
        self.credential = await ensure_admin_credential(ctx.store) or ""
        await self.system.add_worker(WORKER, routes=("vela",), build_limit=2)
        self.backend = ServerBackend(scheduler=self.system.scheduler,
                                     issuer=self.system.authority, settings=self.settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(create_app(self.backend, poll_s=0.05),
                                               log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        pump = asyncio.create_task(self._pump())
        while not server.started:  # noqa: ASYNC110 - uvicorn only offers this flag
            if serving.done():
                await serving  # raises why it stopped
            await asyncio.sleep(0.01)
        self._ready.set()
        await self._stop.wait()
        server.should_exit = True
        await serving
        pump.cancel()
        await self.system.close()
        await engine.dispose()

    async def _pump(self) -> None:
        """What the QueueListener and Scheduler actors do, continuously."""
        while True:
            await self.system.listener.run_until_idle(max_passes=100)
            await self.system.scheduler.check_workers()
            await asyncio.sleep(0.02)


@pytest.fixture(scope="package")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("api"))
    h.start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="package")
def client(harness):
    with TestClient(create_app(harness.remote(), poll_s=0.05),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="package")
def admin(harness) -> dict[str, str]:
    """Headers of an admin API token."""
    return {"Authorization": f"Bearer {harness.token('admin')}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
