"""Chaos run: builds with secrets while actors, workers and nodes are killed at
random, then every invariant checked and printed with its count.

    python bench/chaos.py --seed 7 --builds 500          # the long run
    python bench/chaos.py --seed 7 --builds 500 --redis --postgres
        # queue on Redis (db 14) and the DB on PostgreSQL (database vela_chaos), both
        # restarted mid-run; this stops and starts the machine's Redis and PostgreSQL
    python bench/chaos.py --seed 5 --builds 500 --backlog 2
        # each worker holds two packages beyond its slots (worker.backlog)

The CI-sized run is ``tests/chaos/test_chaos.py`` (same code, fewer builds).
A failing seed reruns the same kill schedule: ``--seed N``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/chaos.py`
    sys.path.insert(0, str(ROOT))

from bench._pg import pg_admin  # noqa: E402

SECRET = "chaos-S3cret-0xC0FFEE"
TERMINAL = {"success", "failure", "error", "killed", "canceled"}
KINDS = ("listener", "scheduler", "authority", "worker_restart", "worker_kill", "node")
PG_CHAOS = "postgresql+asyncpg://postgres@127.0.0.1:5432/vela_chaos"

PIPELINE = """
version: "1"
steps:
  - name: run
    commands:
      - echo "RUN-MARK $VELA_BUILD_ID"
      - echo "secret $CHAOS_TOKEN"
      - sleep {sleep}
    secrets: [chaos_token]
"""


@dataclass
class Report:
    seed: int
    builds: int
    kills: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)  # of the builds not successful
    invariants: dict[str, tuple[bool, str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.invariants.values())

    def lines(self) -> list[str]:
        out = [f"seed {self.seed}: {self.builds} builds in {self.seconds:.0f}s",
               "kills: " + (", ".join(f"{k}={n}" for k, n in sorted(self.kills.items()))
                            or "none"),
               "final statuses: " + ", ".join(f"{k}={n}"
                                              for k, n in sorted(self.statuses.items())),
               "reasons (not successful): " + (", ".join(
                   f"{k}={n}" for k, n in sorted(self.reasons.items())) or "none")]
        for name, (ok, detail) in self.invariants.items():
            out.append(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
        return out


class Chaos:
    """Drives one run on a ``ray.cluster_utils.Cluster`` the caller owns."""

    def __init__(self, cluster: Any, data_dir: Path, *, seed: int, builds: int,
                 kills: int, redis_url: str | None = None, postgres: bool = False,
                 backlog: int = 0) -> None:
        from vela.config import Settings

        self.cluster = cluster
        self.rng = random.Random(seed)
        self.report = Report(seed=seed, builds=builds)
        self.n_builds = builds
        self.n_kills = kills
        queue: dict[str, Any] = {"lease_seconds": 5}
        if redis_url:
            queue.update(backend="redis", redis_url=redis_url)
        self.kinds = KINDS + (("redis",) if redis_url else ()) + (
            ("postgres",) if postgres else ())
        self.settings = Settings.model_validate({
            "server": {"data_dir": str(data_dir)},
            "database": {"url": PG_CHAOS} if postgres else {},
            "ray": {"namespace": f"vela-chaos-{uuid.uuid4().hex[:8]}"},
            "queue": queue,
            "scheduler": {"health_check_period_s": 0.3, "health_check_timeout_s": 5.0,
                          "worker_lost_after_s": 6.0},
            "worker": {"checkin_period_s": 1.0, "log_flush_s": 0.1, "backlog": backlog},
        })
        self.handles: dict[str, Any] = {}
        self.workers: dict[str, Any] = {}  # hostname -> handle
        self.nodes: dict[str, Any] = {}    # hostname -> the extra node it runs on
        self._n = 0

    # -- setup ----------------------------------------------------------------------
    def start(self) -> None:
        from actors.deploy import start_control_plane
        from vela.server.context import bootstrap_database

        if "postgres" in self.kinds:
            pg_admin("DROP DATABASE IF EXISTS vela_chaos", "CREATE DATABASE vela_chaos")
        asyncio.run(bootstrap_database(self.settings))
        if self.settings.queue.backend == "redis":
            self._clear_redis()
        self.handles = start_control_plane(self.settings)
        self.add_worker(restartable=True)
        self.add_worker(restartable=False)
        self.add_worker(on_new_node=True)

    def _clear_redis(self) -> None:
        """The long run's Redis db holds only our queue: start it empty."""
        from redis import Redis

        r = Redis.from_url(self.settings.queue.redis_url.get_secret_value())
        keys = list(r.scan_iter(match="vela:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()

    def add_worker(self, *, restartable: bool = False, on_new_node: bool = False) -> str:
        import ray

        from actors._ray import AUTHORITY
        from actors.deploy import start_worker

        self._n += 1
        hostname = f"chaos-w{self._n}"
        node_id = None
        if on_new_node:
            node = self.cluster.add_node(num_cpus=1, resources={"vela_worker": 1})
            self.cluster.wait_for_nodes()
            self.nodes[hostname] = node
            node_id = node.node_id
        token = self._retry(lambda: ray.get(self.handles[AUTHORITY].registration_token.remote(
            routes=["vela"], hostname=hostname), timeout=30))
        handle, status = start_worker(
            self.settings, hostname=hostname, routes=["vela"], build_limit=2,
            state_dir=self.settings.server.data_dir / "workers" / hostname,
            registration_token=token, node_id=node_id,
            max_restarts=-1 if restartable else 0)
        if not status.get("registered"):
            raise RuntimeError(f"{hostname} did not register: {status}")
        self.workers[hostname] = handle
        return hostname

    @staticmethod
    def _retry(fn: Any, attempts: int = 60) -> Any:
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        from vela.queue.listener import is_transient

        for i in range(attempts):
            try:
                return fn()
            except Exception as e:
                # A restarting actor, or the DB restarting under the call: a client
                # retries both (the error says so, see vela.api.errors).
                retry = isinstance(e, ActorUnavailableError | GetTimeoutError | RayActorError)
                if not (retry or is_transient(e)) or i == attempts - 1:
                    raise
                time.sleep(0.5)
        return None

    def scheduler(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        from actors._ray import SCHEDULER

        h = self.handles[SCHEDULER]
        return self._retry(lambda: ray.get(getattr(h, method).remote(*args, **kwargs),
                                           timeout=60))

    # -- chaos ----------------------------------------------------------------------
    def kill(self, kind: str) -> None:
        import ray

        from actors._ray import AUTHORITY, LISTENER, SCHEDULER

        if kind in ("listener", "scheduler", "authority"):
            name = {"listener": LISTENER, "scheduler": SCHEDULER, "authority": AUTHORITY}[kind]
            ray.kill(self.handles[name], no_restart=False)
        elif kind == "worker_restart":
            restartable = [h for h in self.workers if h == "chaos-w1"]
            if not restartable:
                return
            ray.kill(self.workers[restartable[0]], no_restart=False)
        elif kind == "worker_kill":
            victims = [h for h in self.workers if h != "chaos-w1" and h not in self.nodes]
            if not victims:
                return
            victim = self.rng.choice(victims)
            ray.kill(self.workers.pop(victim), no_restart=True)
            self.add_worker()
        elif kind == "redis":
            _restart_redis()
        elif kind == "postgres":
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main",
                            "restart"], check=True, capture_output=True, timeout=120)
        elif kind == "node":
            if not self.nodes:
                return
            victim = self.rng.choice(sorted(self.nodes))
            self.cluster.remove_node(self.nodes.pop(victim))
            self.workers.pop(victim, None)
            self.add_worker(on_new_node=True)
        self.report.kills[kind] += 1

    def run(self, timeout_s: float = 1800) -> Report:
        t0 = time.monotonic()
        self.start()
        self.scheduler("put_secret", "chaos/app", "chaos_token", SECRET)
        kill_at = sorted(self.rng.sample(range(self.n_builds), min(self.n_kills, self.n_builds)))
        kinds = [self.kinds[i % len(self.kinds)] for i in range(len(kill_at))]
        self.rng.shuffle(kinds)
        ids = []
        for i in range(self.n_builds):
            sleep = self.rng.choice(["0", "0.1", "0.5", "1"])
            ids.append(self.scheduler("create_build", "chaos/app",
                                      PIPELINE.format(sleep=sleep)))
            while kill_at and kill_at[0] == i:
                kill_at.pop(0)
                self.kill(kinds.pop(0))
        views = self.wait_all(ids, t0 + timeout_s)
        self.report.seconds = time.monotonic() - t0
        self.check(views)
        return self.report

    def wait_all(self, ids: list[int], deadline: float) -> dict[int, dict[str, Any]]:
        views: dict[int, dict[str, Any]] = {}
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            still = []
            for b in pending:
                v = self.scheduler("build_view", b)
                if v["status"] in TERMINAL:
                    views[b] = v
                else:
                    still.append(b)
            pending = still
            if pending:
                time.sleep(0.5)
        for b in pending:
            views[b] = self.scheduler("build_view", b)
        return views

    # -- invariants -------------------------------------------------------------------
    def check(self, views: dict[int, dict[str, Any]]) -> None:
        inv = self.report.invariants
        self.report.statuses = Counter(v["status"] for v in views.values())
        self.report.reasons = Counter(f"{v['status']}/{v['reason']}" for v in views.values()
                                      if v["status"] != "success")
        open_ = [b for b, v in views.items() if v["status"] not in TERMINAL]
        unexplained = [b for b, v in views.items()
                       if v["status"] in TERMINAL - {"success"} and not v["reason"]]
        inv["every build terminal with a reason"] = (
            not open_ and not unexplained,
            f"{len(views) - len(open_)}/{len(views)} terminal, {len(unexplained)} without reason")
        runs = {b: "".join(c["text"] for c in v["logs"]).count("RUN-MARK") for b, v in
                views.items()}
        twice = [b for b, n in runs.items() if n > 1]
        inv["no build ran twice (one run's output per build)"] = (
            not twice, f"{sum(runs.values())} runs recorded for {len(runs)} builds; "
                       f"{len(twice)} with more than one"
                       + "".join(f"; build {b}: {runs[b]} runs, attempts "
                                 f"{views[b]['attempts']}, chunks {len(views[b]['logs'])}"
                                 for b in twice[:5]))
        missing = [b for b, v in views.items() if v["status"] == "success" and runs[b] != 1]
        inv["every success has exactly its one run"] = (
            not missing, f"{self.report.statuses['success'] - len(missing)} of "
                         f"{self.report.statuses['success']}")
        leaked = [b for b, v in views.items()
                  if SECRET in "".join(c["text"] for c in v["logs"])]
        in_files = self._secret_in_ray_logs()
        inv["no secret value in logs, actor logs or errors"] = (
            not leaked and not in_files,
            f"{len(leaked)} build logs, {len(in_files)} Ray log files contain it")
        depth = self._queue_depth()
        inv["no queue item lost or left in flight"] = (
            depth == (0, 0), f"ready={depth[0]} in_flight={depth[1]}")
        free, total = self._slots()
        inv["no worker slot leaked"] = (free == total, f"free {free} of {total}")

    def _secret_in_ray_logs(self) -> list[str]:
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path())
        hits = []
        for f in (session / "logs").rglob("*"):
            if f.is_file():
                try:
                    if SECRET.encode() in f.read_bytes():
                        hits.append(f.name)
                except OSError:
                    pass
        return hits

    def _queue_depth(self) -> tuple[int, int]:
        from vela.queue import open_queue

        async def depth() -> tuple[int, int]:
            deadline = time.monotonic() + 30
            while True:
                q = open_queue(self.settings)
                try:
                    d = (await q.depth()).get("vela")
                finally:
                    await q.close()
                ready, flight = (d.ready, d.in_flight) if d else (0, 0)
                if (ready, flight) == (0, 0) or time.monotonic() > deadline:
                    return ready, flight
                await asyncio.sleep(0.5)  # leases of killed listeners expire

        return asyncio.run(depth())

    def _slots(self) -> tuple[int, int]:
        deadline = time.monotonic() + 30
        while True:
            st = self.scheduler("status")
            workers = st["workers"]
            total = sum(w["build_limit"] for w in workers.values() if w["healthy"])
            free = sum(w["build_limit"] - len(w["running"]) for w in workers.values()
                       if w["healthy"])
            if free == total or time.monotonic() > deadline:
                return free, total
            time.sleep(0.5)

    def stop(self) -> None:
        from actors.deploy import stop_all

        stop_all(self.settings.ray.namespace)


def _pg_version() -> str:
    return sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]


def _restart_redis() -> None:
    """Stop Redis without saving (it keeps nothing on disk here) and start it again."""
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True,
                   timeout=30)
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port",
                    "6379", "--save", "", "--appendonly", "no"], check=True,
                   capture_output=True, timeout=30)
    deadline = time.monotonic() + 30
    while subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True,
                         timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("redis did not come back")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--builds", type=int, default=500)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--redis", action="store_true",
                   help="queue on Redis 127.0.0.1:6379/14, restarted mid-run")
    p.add_argument("--postgres", action="store_true",
                   help="database on PostgreSQL (vela_chaos), restarted mid-run")
    p.add_argument("--backlog", type=int, default=0,
                   help="packages each worker holds beyond its slots (worker.backlog)")
    args = p.parse_args(argv)

    from vela.cli.serve_cmd import ensure_ray_auth_token

    ensure_ray_auth_token()  # Ray's token authentication stays on
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            chaos = Chaos(cluster, Path(tmp), seed=args.seed, builds=args.builds,
                          kills=args.kills,
                          redis_url="redis://127.0.0.1:6379/14" if args.redis else None,
                          postgres=args.postgres, backlog=args.backlog)
            try:
                report = chaos.run()
            finally:
                chaos.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
