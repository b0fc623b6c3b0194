"""Dispatch: no-op builds (one step running ``true``) through the real system, side by
side with Celery and with bare Ray actors, in one run on this machine.

    python bench/dispatch.py                        # N=2000; W=2,8; sqlite,postgres; sandbox on,off
    python bench/dispatch.py --builds 300 --workers 2 --backends sqlite
    python bench/dispatch.py --quick                # smoke run (< 1 min): exits 0 if it completes

Systems, each with W build slots (vela: one WorkerActor with build_limit W, as vela
deploys a worker host, or with ``--layout per-slot`` W WorkerActors of one slot each;
each holding ``--backlog`` packages beyond its slots, ``worker.backlog``, default 2;
Celery: one prefork worker, --concurrency W; floor: W Ray actors, one call at a time):

* vela sqlite: the embedded default (SQLite + the database queue) in a temp data dir;
* vela postgres: PostgreSQL (database ``vela_bench`` on 127.0.0.1:5432, created and
  dropped here) + the Redis queue (127.0.0.1:6379 db 13, keys ``vela:queue:*``);
* celery: Redis broker and result backend on 127.0.0.1:6379 db 12, a task that runs
  ``true`` in a subprocess (``bench/celery_noop.py``; needs ``pip install -e '.[bench]'``);
* floor: bare Ray actor calls, a no-op method and one that runs ``true``.

Each system first gets 2W warm-up jobs, then ``--probes`` jobs one at a time (unloaded
latency), then N jobs submitted as fast as the client can (the burst). Measured from the
database rows (vela) or the task's own timestamps (Celery, floor):

* enq->disp: enqueue (the item is on the queue) -> the job starts (vela: the server
  recorded the build's start, which comes back with ``execute_package``'s receipt, or
  from the worker when a held build gets a slot; Celery and floor: the task starts);
* enq->done: enqueue -> finished (vela: the server recorded the finish; Celery: the
  result is stored; floor: the call returned);
* jobs/s: N / (last done - first enqueue) over the burst.

"sandbox off" runs the WorkerActors with a PATH that has no ``bwrap`` (Ray runtime_env)
and ``worker.allow_unsandboxed = true``, so they fall back to the bare runtime; each
worker's status confirms which runtime it got. The sandbox's own cost per step is
measured directly: the exact bubblewrap command line the worker uses vs ``sh -e -c true``.

Targets (burst, sandbox off like Celery, per backend and W): vela builds/s >= 1.0x
Celery tasks/s; vela enq->disp p50 <= 2x Celery enq->start p50. Exit 1 if one fails
(``--quick`` only checks that everything ran).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/dispatch.py`
    sys.path.insert(0, str(ROOT))

from bench._pg import pg_admin  # noqa: E402

PIPELINE = 'version: "1"\nsteps:\n  - name: noop\n    commands:\n      - "true"\n'
REPO = "bench/noop"
PG_BENCH = "postgresql+asyncpg://postgres@127.0.0.1:5432/vela_bench"
REDIS_VELA = "redis://127.0.0.1:6379/13"
REDIS_CELERY = "redis://127.0.0.1:6379/12"
VELA_QUEUE_PREFIX = "vela:queue"
TERMINAL = ("success", "failure", "error", "killed", "canceled")
# A vela build's stages, between the timestamps the server records (builds/steps rows).
STAGES = (
    ("queued", "enqueued_at", "dispatched_at"),       # listener + scheduler pick it up
    ("dispatch->start", "dispatched_at", "started_at"),  # execute_package, build.start report
    ("start->step", "started_at", "step_started_at"),    # workspace, step.running report
    ("step", "step_started_at", "step_finished_at"),     # the process (sandbox), step report
    ("step->finish", "step_finished_at", "finished_at"),  # build.finish report
)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


@dataclass
class Sample:
    """One system's burst (or probes): latencies in seconds."""

    system: str
    workers: int
    sandbox: str
    n: int
    disp: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    span_s: float = float("nan")
    bad: Counter[str] = field(default_factory=Counter)
    # vela only: seconds per stage of each build, from the server's own timestamps
    stages: dict[str, list[float]] = field(default_factory=dict)
    # CPU seconds per job during the burst, by process group (CpuMeter)
    cpu: dict[str, float] = field(default_factory=dict)
    # vela only: requests per call of each coalesced method during the burst
    batching: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n / self.span_s if self.span_s > 0 else float("nan")

    def row(self) -> str:
        ms = [pct(self.disp, 50) * 1e3, pct(self.disp, 99) * 1e3,
              pct(self.done, 50) * 1e3, pct(self.done, 99) * 1e3]
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items()))
        return (f"{self.system:<16} {self.workers:>2} {self.sandbox:>7} {self.n:>5} "
                + " ".join(f"{m:>9.1f}" for m in ms) + f" {self.rate:>8.1f}"
                + (f"  NOT OK: {bad}" if bad else ""))


HEADER = (f"{'system':<16} {'W':>2} {'sandbox':>7} {'N':>5} "
          f"{'disp p50':>9} {'disp p99':>9} {'done p50':>9} {'done p99':>9} {'jobs/s':>8}"
          "\n" + " " * 34 + "(ms: enqueue -> started, enqueue -> finished)")


class CpuMeter:
    """CPU time of every process on the machine across a burst (user and system, with
    that of the children it reaped: the build steps), grouped by who spent it: each Ray
    actor class, Ray's own processes, Celery, Redis, PostgreSQL, this script; the rest
    (other users of a shared machine) apart."""

    def __init__(self) -> None:
        self.before = self._snapshot()
        self.t0 = time.monotonic()

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        import psutil

        out: dict[int, tuple[str, float]] = {}
        for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            times = p.info["cpu_times"]
            if times is not None:
                out[p.pid] = (CpuMeter._group(p.pid, p.info["name"] or "",
                                              " ".join(p.info["cmdline"] or [])),
                              sum(times[:4]))  # user, system, reaped children's too
        return out

    @staticmethod
    def _group(pid: int, name: str, cmdline: str) -> str:
        if pid == os.getpid():
            return "bench driver"
        if name.startswith("ray::"):
            return name.split(".")[0].removeprefix("ray::")
        if "celery" in cmdline:
            return "celery"
        if name in ("raylet", "gcs_server") or "/ray/" in cmdline:
            return "ray system"
        if name.startswith("redis"):
            return "redis"
        if name.startswith("postgres"):
            return "postgres"
        return OTHER

    def per_job(self, n: int) -> dict[str, float]:
        """CPU seconds per job by group since this meter started; ``busy`` is the share
        of the machine's cores that all of it (others' included) took."""
        spent: Counter[str] = Counter()
        for pid, (group, cpu) in self._snapshot().items():
            spent[group] += cpu - self.before.get(pid, (group, 0.0))[1]
        wall = time.monotonic() - self.t0
        out = {g: v / n for g, v in spent.most_common() if v > 0.005}
        out["busy"] = sum(spent.values()) / (wall * (os.cpu_count() or 1))
        return out


OTHER = "not ours"


def cpu_line(s: Sample) -> str:
    ours = {g: v for g, v in s.cpu.items() if g not in ("busy", OTHER)}
    parts = ", ".join(f"{g} {v * 1e3:.1f}" for g, v in ours.items())
    return (f"{s.system:<16} {s.workers:>2} {s.sandbox:>7}  {sum(ours.values()) * 1e3:6.1f} ms"
            f"  ({parts}; machine {s.cpu['busy']:.0%} busy)")


def from_stamps(sample: Sample, stamps: list[tuple[float, float, float]]) -> Sample:
    """(enqueued, dispatched, done) epoch seconds per job."""
    sample.disp = [d - e for e, d, _ in stamps]
    sample.done = [f - e for e, _, f in stamps]
    if stamps:
        sample.span_s = max(f for _, _, f in stamps) - min(e for e, _, _ in stamps)
    return sample


def epoch(t: datetime | None) -> float:
    if t is None:
        return float("nan")
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


# -- vela -------------------------------------------------------------------------------

class Db:
    """The benchmark's own read-only view of the builds table."""

    def __init__(self, url: str) -> None:
        from vela.db.engine import create_engine

        self.loop = asyncio.new_event_loop()
        self.engine = create_engine(url)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def finished(self, lo: int, hi: int) -> int:
        from sqlalchemy import func, select

        from vela.db.models import Build

        async def go() -> int:
            async with self.engine.connect() as c:
                q = select(func.count()).select_from(Build).where(
                    Build.id.between(lo, hi), Build.finished_at.is_not(None))
                return int((await c.execute(q)).scalar_one())

        return self.run(go())

    def rows(self, lo: int, hi: int) -> list[Any]:
        """Each build's timestamps, with those of its (one) step."""
        from sqlalchemy import select

        from vela.db.models import Build, Step

        async def go() -> list[Any]:
            async with self.engine.connect() as c:
                q = (select(Build.id, Build.status, Build.reason, Build.enqueued_at,
                            Build.dispatched_at,
                            Build.started_at, Build.finished_at,
                            Step.started_at.label("step_started_at"),
                            Step.finished_at.label("step_finished_at"))
                     .join(Step, (Step.build_id == Build.id) & (Step.number == 1))
                     .where(Build.id.between(lo, hi)))
                return list((await c.execute(q)).all())

        return self.run(go())

    def close(self) -> None:
        self.run(self.engine.dispose())
        self.loop.close()


def _clear_vela_redis() -> None:
    from redis import Redis

    r = Redis.from_url(REDIS_VELA)
    try:
        keys = list(r.scan_iter(match=f"{VELA_QUEUE_PREFIX}:*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


def no_bwrap_path(bin_dir: Path) -> str:
    """This process's PATH with every directory that holds ``bwrap`` replaced by
    ``bin_dir``: links to all of that directory but ``bwrap`` (Ray's worker start-up
    needs ``bash`` from the PATH, so the directories cannot simply go)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    out: list[str] = [str(Path(sys.executable).parent)]
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not Path(d).is_dir():
            continue
        if not (Path(d) / "bwrap").exists():
            out.append(d)
            continue
        for entry in Path(d).iterdir():
            link = bin_dir / entry.name
            if entry.name != "bwrap" and not link.exists():
                link.symlink_to(entry)
        if str(bin_dir) not in out:
            out.append(str(bin_dir))
    return os.pathsep.join(out)


class VelaRun:
    """The control plane and W workers in their own namespace and data dir."""

    def __init__(self, backend: str, workers: int, sandbox: bool, data_dir: Path,
                 layout: str = "per-node", backlog: int = 0) -> None:
        from vela.config import Settings

        self.backend, self.n_workers, self.sandbox = backend, workers, sandbox
        # W slots: on one WorkerActor (a worker host), or one WorkerActor per slot.
        self.actors, self.slots = (1, workers) if layout == "per-node" else (workers, 1)
        self.data_dir = data_dir
        cfg: dict[str, Any] = {
            "server": {"data_dir": str(data_dir)},
            "ray": {"namespace": f"vela-bench-{uuid.uuid4().hex[:8]}"},
            "worker": {"allow_unsandboxed": not sandbox, "backlog": backlog},
        }
        if backend == "postgres":
            cfg["database"] = {"url": PG_BENCH}
            cfg["queue"] = {"backend": "redis", "redis_url": REDIS_VELA}
        self.settings = Settings.model_validate(cfg)
        self.handles: dict[str, Any] = {}
        self.workers: list[Any] = []
        self.db: Db | None = None

    @property
    def label(self) -> str:
        return f"vela {self.backend}"

    def start(self) -> None:
        from actors.deploy import start_control_plane
        from vela.server.context import bootstrap_database

        if self.backend == "postgres":
            pg_admin("DROP DATABASE IF EXISTS vela_bench WITH (FORCE)",
                      "CREATE DATABASE vela_bench")
            _clear_vela_redis()

        asyncio.run(bootstrap_database(self.settings))
        self.handles = start_control_plane(self.settings)
        want = "BwrapRuntime" if self.sandbox else "LocalRuntime"
        for i in range(self.actors):
            status = self._add_worker(f"bench-w{i + 1}")
            if not status.get("registered") or status.get("sandbox") != want:
                raise RuntimeError(f"worker {i + 1}: wanted {want}, got {status}")
        self.db = Db(self.settings.database_url())

    def _add_worker(self, hostname: str) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from actors._ray import AUTHORITY, worker_actor_name
        from actors.deploy import start_worker
        from actors.worker import WorkerActor

        token = ray.get(self.handles[AUTHORITY].registration_token.remote(
            routes=["vela"], hostname=hostname))
        state_dir = self.data_dir / "workers" / hostname
        if self.sandbox:
            handle, status = start_worker(self.settings, hostname=hostname, routes=["vela"],
                                          build_limit=self.slots, state_dir=state_dir,
                                          registration_token=token, max_restarts=0)
            self.workers.append(handle)
            return status
        # As start_worker, plus a PATH without bwrap: the worker falls back to the bare
        # runtime, which worker.allow_unsandboxed permits.
        handle = WorkerActor.options(
            name=worker_actor_name(hostname), namespace=self.settings.ray.namespace,
            lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=0,
            max_task_retries=0,
            runtime_env={"env_vars": {"PATH": no_bwrap_path(self.data_dir / "no-bwrap-bin")}},
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(self.settings, hostname=hostname, routes=["vela"], build_limit=self.slots,
                 state_dir=str(state_dir.resolve()), registration_token=token)
        self.workers.append(handle)
        return ray.get(handle.wait_registered.remote(120.0), timeout=150)

    def call_counts(self) -> dict[str, tuple[int, int]]:
        """(calls, requests) so far per coalesced method, all processes summed."""
        import ray

        from actors._ray import SCHEDULER

        calls = ray.get(self.handles[SCHEDULER].status.remote(), timeout=60)["calls"]
        groups = [calls["authority"], calls["database"], *calls["workers"].values(),
                  *(ray.get(w.status.remote(), timeout=60)["calls"] for w in self.workers)]
        out: dict[str, tuple[int, int]] = {}
        for group in groups:
            for name, c in group.items():
                n, r = out.get(name, (0, 0))
                out[name] = (n + c["calls"], r + c["requests"])
        return out

    def create(self) -> Any:
        from actors._ray import SCHEDULER

        return self.handles[SCHEDULER].create_build.remote(REPO, PIPELINE)

    def wait(self, lo: int, hi: int, timeout_s: float, every_s: float = 0.5) -> None:
        assert self.db is not None
        n, deadline, last = hi - lo + 1, time.monotonic() + timeout_s, time.monotonic()
        while (done := self.db.finished(lo, hi)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label}: {done}/{n} builds finished in {timeout_s}s")
            if time.monotonic() - last > 10:
                say(f"  {self.label} W={self.n_workers}: {done}/{n} finished")
                last = time.monotonic()
            time.sleep(every_s)

    def burst(self, n: int, in_flight: int = 16) -> list[int]:
        """Create ``n`` builds, ``in_flight`` create calls at a time; their ids."""
        import ray

        ids: list[int] = []
        refs: list[Any] = []
        for _ in range(n):
            refs.append(self.create())
            if len(refs) >= in_flight:
                ready, refs = ray.wait(refs, num_returns=1)
                ids.extend(ray.get(ready))
        ids.extend(ray.get(refs))
        return ids

    def sample(self, ids: list[int], n: int) -> Sample:
        assert self.db is not None
        s = Sample(self.label, self.n_workers, "on" if self.sandbox else "off", n)
        rows = [r for r in self.db.rows(min(ids), max(ids)) if r.id in set(ids)]
        s.bad = Counter(f"{r.status}({r.reason})" for r in rows if r.status != "success")
        for name, a, b in STAGES:
            s.stages[name] = [epoch(getattr(r, b)) - epoch(getattr(r, a)) for r in rows]
        return from_stamps(s, [(epoch(r.enqueued_at), epoch(r.started_at),
                                epoch(r.finished_at)) for r in rows])

    def stop(self) -> None:
        from actors.deploy import stop_all

        stop_all(self.settings.ray.namespace)
        if self.db is not None:
            self.db.close()
        if self.backend == "postgres":
            pg_admin("DROP DATABASE IF EXISTS vela_bench WITH (FORCE)")
            _clear_vela_redis()


def run_vela(backend: str, workers: int, sandbox: bool, n: int, probes: int,
             py_spy: Path | None = None, layout: str = "per-node",
             backlog: int = 0) -> tuple[Sample, Sample]:
    """(burst, probes) for one configuration; with ``py_spy``, the burst is profiled."""
    import ray

    with tempfile.TemporaryDirectory(prefix="vela-bench-") as tmp:
        run = VelaRun(backend, workers, sandbox, Path(tmp), layout, backlog)
        say(f"{run.label} W={workers} sandbox={'on' if sandbox else 'off'}: starting")
        try:
            run.start()
            warm = run.burst(2 * workers)
            run.wait(min(warm), max(warm), 120)
            probe_ids = []
            for _ in range(probes):
                b = ray.get(run.create())
                run.wait(b, b, 60, every_s=0.01)
                probe_ids.append(b)
            say(f"{run.label} W={workers}: {n} builds")
            spies = []
            if py_spy is not None:
                out = py_spy / f"{backend}-w{workers}-sandbox-{'on' if sandbox else 'off'}"
                spies = Spy.attach({**run.handles, "worker-1": run.workers[0]}, out)
            meter = CpuMeter()
            calls_before = run.call_counts()
            ids = run.burst(n)
            say(f"  {run.label} W={workers}: {n} builds created")
            run.wait(min(ids), max(ids), max(600.0, n * 2.0), every_s=0.1)
            cpu = meter.per_job(n)
            calls_after = run.call_counts()
            for spy in spies:
                spy.stop()
                say(spy.summary())
            burst = run.sample(ids, n)
            burst.cpu = cpu
            for name, (calls, requests) in calls_after.items():
                calls0, requests0 = calls_before.get(name, (0, 0))
                burst.batching[name] = (requests - requests0) / max(calls - calls0, 1)
            probe = run.sample(probe_ids, probes) if probe_ids else Sample(
                run.label, workers, burst.sandbox, 0)
        finally:
            run.stop()
    say(f"  {burst.row()}")
    return burst, probe


class Spy:
    """``py-spy record`` on one actor's process (CPU samples only: an actor waiting on
    its event loop is idle and not sampled)."""

    RATE = 100

    def __init__(self, name: str, pid: int, path: Path) -> None:
        import psutil

        self.name, self.path = name, path
        exe = Path(sys.executable).parent / "py-spy"
        self.process = psutil.Process(pid)
        self.cpu0 = sum(self.process.cpu_times()[:2])
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(exe), "record", "--pid", str(pid), "--rate", str(self.RATE), "--format",
             "raw", "--output", str(path), "--nonblocking", "--full-filenames"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @classmethod
    def attach(cls, handles: dict[str, Any], out: Path) -> list[Spy]:
        import ray

        out.mkdir(parents=True, exist_ok=True)
        spies = []
        for name, handle in handles.items():
            pid = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()))
            spies.append(cls(name, pid, out / f"{name}.txt"))
        return spies

    def stop(self) -> None:
        self.seconds = time.monotonic() - self.t0
        self.cpu = sum(self.process.cpu_times()[:2]) - self.cpu0
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def summary(self, top: int = 8) -> str:
        """CPU use, and the product functions (vela/, actors/) that hold it, inclusive of
        what they call: the deepest product frame of each sample."""
        own: Counter[str] = Counter()
        total = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():
                    continue
                n = int(count)
                total += n
                frames = [f for f in stack.split(";") if "/vela/" in f or "/actors/" in f]
                own[_frame(frames[-1]) if frames else "(no product frame: Ray, asyncio)"] += n
        # CPU from the OS (py-spy's samples count every busy thread, Ray's own included)
        lines = [f"{self.name}: {self.cpu:.1f} CPU-s in {self.seconds:.0f} s "
                 f"({self.cpu / max(self.seconds, 1e-9):.0%} of a core); py-spy "
                 f"{total} samples -> {self.path}"]
        for frame, n in own.most_common(top):
            lines.append(f"    {n / max(total, 1):6.1%}  {frame}")
        return "\n".join(lines)


def _frame(f: str) -> str:
    """'func (/path/to/vela/x.py:12)' -> 'func (vela/x.py)'."""
    name, _, where = f.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for root in ("/vela/", "/actors/"):
        if root in where:
            where = root.strip("/") + "/" + where.split(root, 1)[1]
            break
    return f"{name} ({where})"


# -- Celery ---------------------------------------------------------------------------

def run_celery(workers: int, n: int, probes: int) -> tuple[Sample, Sample]:
    from bench import celery_noop

    queue = f"vela-bench-{uuid.uuid4().hex[:8]}"
    app = celery_noop.app
    app.conf.update(broker_url=REDIS_CELERY, result_backend=REDIS_CELERY,
                    task_default_queue=queue)
    env = {**os.environ, "VELA_BENCH_CELERY_BROKER": REDIS_CELERY,
           "VELA_BENCH_CELERY_QUEUE": queue,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    say(f"celery W={workers}: starting a prefork worker, concurrency {workers}")
    with tempfile.NamedTemporaryFile(prefix="vela-bench-celery-", suffix=".log") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.celery_noop", "worker",
             "--pool", "prefork", "--concurrency", str(workers), "-Q", queue,
             "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"{queue}@%h"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        results: list[Any] = []
        try:
            def send() -> Any:
                r = celery_noop.noop.apply_async(queue=queue)
                results.append(r)
                return r, time.time()

            def collect(sent: list[tuple[Any, float]], label: str, n_: int) -> Sample:
                stamps = []
                for i, (r, enq) in enumerate(sent):
                    started, _ = r.get(timeout=600)
                    stamps.append((enq, started, epoch(r.date_done)))
                    if i and i % 500 == 0:
                        say(f"  celery W={workers}: {i}/{len(sent)} collected")
                return from_stamps(Sample(label, workers, "none", n_), stamps)

            try:
                collect([send() for _ in range(2 * workers)], "celery", 2 * workers)
            except Exception:
                log.seek(0)
                say(log.read().decode(errors="replace")[-2000:])
                raise
            probe_sent = []
            for _ in range(probes):
                r, enq = send()
                r.get(timeout=60)
                probe_sent.append((r, enq))
            probe = collect(probe_sent, "celery", probes)
            say(f"celery W={workers}: {n} tasks")
            meter = CpuMeter()
            sent = [send() for _ in range(n)]
            for r, _ in sent:
                r.get(timeout=600)
            cpu = meter.per_job(n)
            burst = collect(sent, "celery", n)
            burst.cpu = cpu
        finally:
            for r in results:
                r.forget()
            os.killpg(proc.pid, signal.SIGTERM)  # warm shutdown of the worker we started
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
            _clear_celery_queue(queue)
    say(f"  {burst.row()}")
    return burst, probe


def _clear_celery_queue(queue: str) -> None:
    """The queue's list and kombu's binding keys (names differ across kombu versions)."""
    from redis import Redis

    r = Redis.from_url(REDIS_CELERY)
    try:
        r.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}",
                 *(f"{queue}\x06\x16{p}" for p in range(10)))
        if r.type("_kombu.binding_deadlines") == b"zset":
            # db 12 is this benchmark's: the worker's control (pidbox) entry goes too
            r.zrem("_kombu.binding_deadlines", queue, "celery.pidbox")
            if r.zcard("_kombu.binding_deadlines") == 0:
                r.delete("_kombu.binding_deadlines")
    finally:
        r.close()


# -- the floor: bare Ray actors ---------------------------------------------------------

def run_floor(workers: int, n: int, probes: int, method: str) -> tuple[Sample, Sample]:
    import ray

    @ray.remote(num_cpus=0)
    class Floor:
        def noop(self) -> list[float]:
            t = time.time()
            return [t, t]

        def true(self) -> list[float]:
            t = time.time()
            subprocess.run(["true"], check=True)
            return [t, time.time()]

    label = f"ray floor {method}"
    actors = [Floor.remote() for _ in range(workers)]
    try:
        ray.get([a.__ray_ready__.remote() for a in actors])

        def go(count: int, one_at_a_time: bool) -> Sample:
            sent: list[tuple[Any, float]] = []
            for i in range(count):
                enq = time.time()
                ref = getattr(actors[i % workers], method).remote()
                sent.append((ref, enq))
                if one_at_a_time:
                    ray.get(ref)
            out = ray.get([r for r, _ in sent])
            return from_stamps(Sample(label, workers, "none", count),
                               [(enq, s, f) for (_, enq), (s, f) in zip(sent, out, strict=True)])

        go(2 * workers, False)
        probe = go(probes, True)
        burst = go(n, False)
    finally:
        for a in actors:
            ray.kill(a)
    say(f"  {burst.row()}")
    return burst, probe


# -- the sandbox's own cost per step ------------------------------------------------------

def sandbox_cost(n: int) -> dict[str, float]:
    """Median seconds per process: the worker's bwrap command line vs bare sh."""
    from vela.executor.runtime import DEFAULT_PATH, BuildDirs, BwrapRuntime

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vela-bench-sbx-") as tmp:
        dirs = BuildDirs.create(Path(tmp))
        # As the worker builds it: the default network setting, the default hidden paths.
        from vela.config import WorkerSettings

        bwrap = BwrapRuntime(network=WorkerSettings().network).argv("true", dirs)
        for name, argv in (("bwrap", bwrap), ("sh", ["/bin/sh", "-e", "-c", "true"])):
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                subprocess.run(argv, env={"PATH": DEFAULT_PATH}, cwd=dirs.workspace,
                               stdin=subprocess.DEVNULL, capture_output=True, check=True,
                               start_new_session=True)
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times)
    return out


# -- main -------------------------------------------------------------------------------

def check(results: dict[tuple[str, int, str], Sample], workers: list[int],
          backends: list[str], sandboxes: list[str]) -> list[tuple[str, bool]]:
    """The targets, like with like: sandbox off where it ran, else on."""
    out = []
    mode = "off" if "off" in sandboxes else "on"
    for w in workers:
        celery = results.get(("celery", w, "none"))
        if celery is None:
            continue
        for b in backends:
            v = results.get((f"vela {b}", w, mode))
            if v is None:
                continue
            r_rate = v.rate / celery.rate
            r_disp = pct(v.disp, 50) / pct(celery.disp, 50)
            out.append((f"W={w} {b:<8} sandbox {mode}: builds/s {v.rate:.1f} vs celery "
                        f"{celery.rate:.1f} = {r_rate:.2f}x (target >= 1.0)", r_rate >= 1.0))
            out.append((f"W={w} {b:<8} sandbox {mode}: dispatch p50 "
                        f"{pct(v.disp, 50) * 1e3:.0f} ms vs celery start p50 "
                        f"{pct(celery.disp, 50) * 1e3:.0f} ms = {r_disp:.2f}x (target <= 2.0)",
                        r_disp <= 2.0))
    return out


def ratios(results: dict[tuple[str, int, str], Sample], workers: list[int]) -> list[str]:
    lines = []
    for w in workers:
        celery = results.get(("celery", w, "none"))
        floor = results.get(("ray floor true", w, "none"))
        floor0 = results.get(("ray floor noop", w, "none"))
        for (system, ww, sbx), s in results.items():
            if ww != w or not system.startswith("vela"):
                continue
            parts = [f"W={w} {system:<13} sandbox {sbx:<3}:"]
            if celery:
                parts.append(f"vela/celery jobs/s {s.rate / celery.rate:5.2f}  "
                             f"disp p50 {pct(s.disp, 50) / pct(celery.disp, 50):6.1f}x  "
                             f"done p50 {pct(s.done, 50) / pct(celery.done, 50):6.1f}x")
            for name, f in (("floor(true)", floor), ("floor(noop)", floor0)):
                if f:
                    parts.append(f"| vela/{name} jobs/s {s.rate / f.rate:5.3f}")
            lines.append(" ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builds", type=int, default=2000, help="N, jobs per burst")
    p.add_argument("--workers", default="2,8", help="W values, comma-separated")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--sandbox", default="on,off", help="on, off or on,off")
    p.add_argument("--probes", type=int, default=20, help="jobs sent one at a time")
    p.add_argument("--layout", choices=["per-node", "per-slot"], default="per-node",
                   help="vela's W slots on one WorkerActor (per-node, how vela deploys a "
                        "worker host) or on W WorkerActors of one slot (per-slot)")
    p.add_argument("--backlog", type=int, default=2,
                   help="packages each WorkerActor holds beyond its slots (worker.backlog; "
                        "Celery's worker prefetches 4 tasks per process by default)")
    p.add_argument("--no-celery", action="store_true")
    p.add_argument("--sandbox-samples", type=int, default=200)
    p.add_argument("--py-spy", type=Path, metavar="DIR",
                   help="profile each vela burst: py-spy on the control actors and one "
                        "worker, raw stacks written to DIR, a summary printed")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: N=20, W=2, sqlite, probes 3; exit 0 if it completes")
    args = p.parse_args(argv)
    if args.quick:
        args.builds, args.workers, args.backends, args.probes = 20, "2", "sqlite", 3
        args.sandbox_samples = 20
    workers = [int(w) for w in args.workers.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    sandboxes = [s for s in args.sandbox.split(",") if s]
    if set(backends) - {"sqlite", "postgres"} or set(sandboxes) - {"on", "off"}:
        p.error("--backends: sqlite,postgres; --sandbox: on,off")

    from vela.cli.serve_cmd import ensure_ray_auth_token

    ensure_ray_auth_token()  # Ray's token authentication stays on, on a fresh machine too
    import ray

    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    results: dict[tuple[str, int, str], Sample] = {}
    probes: dict[tuple[str, int, str], Sample] = {}

    def keep(pair: tuple[Sample, Sample]) -> None:
        burst, probe = pair
        results[(burst.system, burst.workers, burst.sandbox)] = burst
        probes[(burst.system, burst.workers, burst.sandbox)] = probe

    try:
        for w in workers:
            for b in backends:
                for sbx in sandboxes:
                    keep(run_vela(b, w, sbx == "on", args.builds, args.probes, args.py_spy,
                                  args.layout, args.backlog))
            if not args.no_celery:
                keep(run_celery(w, args.builds, args.probes))
            keep(run_floor(w, args.builds, args.probes, "true"))
            keep(run_floor(w, args.builds, args.probes, "noop"))
        cost = sandbox_cost(args.sandbox_samples)
    finally:
        ray.shutdown()

    print(f"dispatch: N={args.builds} per burst, {os.cpu_count()} cores, "
          f"{time.monotonic() - t0:.0f}s in all; vela's W slots {args.layout} "
          f"({'one WorkerActor' if args.layout == 'per-node' else 'W WorkerActors'}), "
          f"backlog {args.backlog} per WorkerActor")
    print("\nburst (N jobs submitted at once)")
    print(HEADER)
    for s in results.values():
        print(s.row())
    if args.probes:
        print(f"\nunloaded ({args.probes} jobs, one at a time)")
        print(HEADER)
        for s in probes.values():
            print(s.row())
    staged = [("burst", k, v) for k, v in results.items() if v.stages] + [
        ("unloaded", k, v) for k, v in probes.items() if v.stages]
    if staged:
        print("\nvela stages (p50 ms, from the server's timestamps)")
        print(f"{'':<9} {'system':<14} {'W':>2} {'sandbox':>7} "
              + " ".join(f"{name:>15}" for name, _, _ in STAGES))
        for kind, (system, w, sbx), sample in staged:
            print(f"{kind:<9} {system:<14} {w:>2} {sbx:>7} "
                  + " ".join(f"{pct(sample.stages[name], 50) * 1e3:>15.1f}"
                             for name, _, _ in STAGES))
    metered = [v for v in results.values() if v.cpu]
    if metered:
        print("\nCPU per job in the burst, all processes (ms; by process group)")
        for sample in metered:
            print(cpu_line(sample))
    batched = [v for v in results.values() if v.batching]
    if batched:
        print("\nrequests per coalesced call in the burst (vela.coalesce)")
        for v in batched:
            print(f"{v.system:<14} {v.workers:>2} {v.sandbox:>7}  " + ", ".join(
                f"{name} {per:.1f}" for name, per in sorted(v.batching.items())))
    print(f"\nsandbox cost per step: bwrap {cost['bwrap'] * 1e3:.1f} ms, sh {cost['sh'] * 1e3:.1f}"
          f" ms, difference {(cost['bwrap'] - cost['sh']) * 1e3:.1f} ms (median of "
          f"{args.sandbox_samples})")
    print("\nratios (burst)")
    for line in ratios(results, workers):
        print(line)
    targets = check(results, workers, backends, sandboxes)
    print("\ntargets")
    for text, ok in targets:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    broken = [s for s in [*results.values(), *probes.values()] if s.bad]
    if broken:
        print(f"{len(broken)} runs had builds that did not succeed (see NOT OK above)")
        return 1
    if args.quick:
        return 0
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
