"""vela without Ray: the whole server and its workers in one process, so the CPU per
no-op build is vela's own work — the Scheduler, the TokenAuthority, the listener, the
workers and the database — and nothing of Ray's. Beside `bench/dispatch.py`'s figures
(all processes, through Ray) the difference is what Ray's calls and processes add.

The parts are the real ones (SQLite, the database queue, the challenge, the token and
sealed package, the step, every report checked and written); only the Ray clients are
replaced by direct calls, coalesced as in production — the test suite's in-process
server (``tests/server/conftest.py``). Builds are created 16 at a time, as
`bench/dispatch.py` creates them. One process has one interpreter lock, so its
builds/s are bounded by about one core; the CPU per build is the figure to compare.

    python bench/inprocess.py                        # N=600, W=2 and 8, sandbox off
    python bench/inprocess.py --sandbox on --builds 300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select  # noqa: E402

from bench.dispatch import PIPELINE, REPO, TERMINAL  # noqa: E402
from vela.config import Settings  # noqa: E402
from vela.db.engine import database  # noqa: E402
from vela.db.models import Build  # noqa: E402
from vela.db.store import Store  # noqa: E402
from vela.executor import LocalRuntime, choose_runtime  # noqa: E402
from vela.queue.db_queue import DatabaseQueue  # noqa: E402
from vela.server.context import ServerContext  # noqa: E402

IN_FLIGHT = 16


async def run(workers: int, n: int, backlog: int, sandbox: bool) -> tuple[float, float, float]:
    """(builds/s, CPU ms per build in this process, CPU ms per build of the steps)."""
    from tests.conftest import fresh_engine
    from tests.server.conftest import System

    with tempfile.TemporaryDirectory(prefix="vela-inprocess-") as tmp:
        engine = await fresh_engine(f"sqlite+aiosqlite:///{tmp}/vela.db")
        settings = Settings.model_validate({"server": {"data_dir": tmp}})
        master_key = os.urandom(32)
        ctx = ServerContext(settings=settings, engine=engine, store=Store(engine, master_key),
                            master_key=master_key)
        system = System(settings=settings, ctx=ctx, tmp=Path(tmp), queue=DatabaseQueue(engine))
        await system.start()
        # The listener as production configures it (the test suite's polls faster).
        system.listener = await ctx.listener(system.queue, system.scheduler)
        runtime = (choose_runtime(allow_unsandboxed=False, network=False) if sandbox
                   else LocalRuntime())
        await system.add_worker("w1", build_limit=workers, backlog=backlog, runtime=runtime)
        stop = asyncio.Event()
        listener = asyncio.create_task(system.listener.run_forever(stop))

        async def watch() -> None:
            while not stop.is_set():
                await system.scheduler.check_workers()
                await asyncio.sleep(settings.scheduler.health_check_period_s)

        watcher = asyncio.create_task(watch())
        db = database(engine)

        async def ended() -> int:
            return int(await db.read(lambda s: s.scalar(
                select(func.count()).select_from(Build).where(Build.status.in_(TERMINAL)))) or 0)

        async def burst(count: int) -> tuple[float, float, float]:
            before, room = await ended(), asyncio.Semaphore(IN_FLIGHT)

            async def create() -> None:
                async with room:
                    await system.scheduler.builds.create(REPO, PIPELINE, route="vela")

            t0, cpu0, kids0 = time.perf_counter(), time.process_time(), _children()
            await asyncio.gather(*(create() for _ in range(count)))
            while await ended() < before + count:  # noqa: ASYNC110 - the rows say when
                await asyncio.sleep(0.02)
            seconds = time.perf_counter() - t0
            return (count / seconds, (time.process_time() - cpu0) / count * 1e3,
                    (_children() - kids0) / count * 1e3)

        try:
            await burst(2 * workers)  # warm up
            return await burst(n)
        finally:
            stop.set()
            watcher.cancel()
            await listener
            await system.close()
            await engine.dispose()


def _children() -> float:
    t = os.times()
    return t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builds", type=int, default=600)
    p.add_argument("--workers", default="2,8", help="build slots, comma-separated")
    p.add_argument("--backlog", type=int, default=2, help="packages held beyond the slots")
    p.add_argument("--sandbox", choices=["on", "off"], default="off")
    args = p.parse_args(argv)
    print(f"vela in one process (no Ray): N={args.builds}, backlog {args.backlog}, "
          f"sandbox {args.sandbox}, SQLite + the database queue")
    print(f"{'W':>3} {'builds/s':>9} {'CPU ms/build':>13} {'steps ms/build':>15}")
    for w in (int(x) for x in args.workers.split(",")):
        rate, cpu, steps = asyncio.run(run(w, args.builds, args.backlog, args.sandbox == "on"))
        print(f"{w:>3} {rate:>9.1f} {cpu:>13.2f} {steps:>15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
