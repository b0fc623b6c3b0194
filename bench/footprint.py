"""Footprint: a WorkerActor's memory, idle and busy, and `vela serve`'s cold start vs a
bare ``ray.init`` + the migrations, in the same run.

    python bench/footprint.py [--repeats 3] [--busy-builds 4]
    python bench/footprint.py --skip-serve        # memory only

Memory (one Ray started here, ``num_cpus=2``, no dashboard; SQLite in a temp dir): the
RSS and USS (memory only that process holds) of the WorkerActor's process, by the pid
its ``status`` returns — right after it registered (idle), while ``--busy-builds``
builds run at once on it (busy: peak of samples every 50 ms; each build prints 20,000
log lines and sleeps), and idle again afterwards. Beside it, an empty Ray actor's
process: the floor any actor pays.

Cold start (``--repeats`` times each, alternating, median): wall time from launching
the command to "ready", each in a fresh Python process and a fresh data directory:

* ``vela serve --detach --local-workers 0`` with its own data dir, head port 6392 and
  dashboard port 8267 (VELA_SERVER_DATA_DIR, VELA_RAY_HEAD_PORT,
  VELA_RAY_DASHBOARD_PORT), then ``vela stop`` (which stops only its own head);
* bare: ``ray.init(address="local")`` with the dashboard (as ``vela serve`` starts one;
  port 8268), then the migrations + first keys on a fresh SQLite database; and the
  same without the dashboard, for reference;
* for reference, what a detached server needs at least: ``ray start --head`` (port
  6393, dashboard 8269) and then the migrations in a new process.

Targets: idle WorkerActor RSS <= 150 MB; cold start <= 1.5x bare ray.init + migrations.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

MB = 1024 * 1024
BUSY_PIPELINE = """
version: "1"
steps:
  - name: busy
    commands:
      - seq 1 20000
      - sleep 2
"""
IDLE_TARGET_MB = 150.0
COLD_TARGET = 1.5


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- memory -------------------------------------------------------------------------------

def mem(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MB."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return info.rss / MB, info.uss / MB


def measure_memory(busy_builds: int) -> dict[str, tuple[float, float]]:
    import ray

    from actors._ray import AUTHORITY, SCHEDULER
    from actors.deploy import start_control_plane, start_worker, stop_all
    from vela.config import Settings
    from vela.server.context import bootstrap_database

    out: dict[str, tuple[float, float]] = {}

    @ray.remote(num_cpus=0)
    class Empty:
        def pid(self) -> int:
            return os.getpid()

    e = Empty.remote()
    time.sleep(1.0)
    out["empty Ray actor (floor)"] = mem(ray.get(e.pid.remote()))
    ray.kill(e)

    with tempfile.TemporaryDirectory(prefix="vela-bench-fp-") as tmp:
        settings = Settings.model_validate({
            "server": {"data_dir": tmp},
            "ray": {"namespace": f"vela-bench-{uuid.uuid4().hex[:8]}"},
        })

        asyncio.run(bootstrap_database(settings))
        handles = start_control_plane(settings)
        try:
            token = ray.get(handles[AUTHORITY].registration_token.remote(
                routes=["vela"], hostname="fp-w1"))
            worker, status = start_worker(
                settings, hostname="fp-w1", routes=["vela"], build_limit=busy_builds,
                state_dir=Path(tmp) / "workers" / "fp-w1", registration_token=token,
                max_restarts=0)
            if not status.get("registered"):
                raise RuntimeError(f"worker did not register: {status}")
            pid = int(status["pid"])
            say(f"WorkerActor pid {pid}, sandbox {status['sandbox']}")
            time.sleep(2.0)
            out["WorkerActor idle (registered)"] = mem(pid)

            sched = handles[SCHEDULER]
            ids = ray.get([sched.create_build.remote("bench/busy", BUSY_PIPELINE)
                           for _ in range(busy_builds)])
            peak, most = (0.0, 0.0), 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                rss, uss = mem(pid)
                peak = (max(peak[0], rss), max(peak[1], uss))
                running = ray.get(worker.status.remote())["running"]
                most = max(most, len(running))
                if most and not running:
                    break
                time.sleep(0.05)
            finals = [ray.get(sched.build_view.remote(b))["status"] for b in ids]
            if any(s != "success" for s in finals):
                raise RuntimeError(f"busy builds did not all succeed: {finals}")
            say(f"busy: up to {most} builds at once on the worker")
            out[f"WorkerActor busy ({busy_builds} builds, peak)"] = peak
            time.sleep(2.0)
            out["WorkerActor idle (after the builds)"] = mem(pid)
        finally:
            stop_all(settings.ray.namespace)
    return out


# -- cold start ---------------------------------------------------------------------------

BARE = r"""
import asyncio, sys, tempfile, time
import ray
ray.init(address="local", num_cpus=2, include_dashboard={dash}, dashboard_port=8268,
         logging_level="WARNING", log_to_driver=False)
from vela.config import Settings
from vela.server.context import bootstrap_database
with tempfile.TemporaryDirectory(prefix="vela-bench-bare-") as tmp:
    asyncio.run(bootstrap_database(Settings.model_validate({{"server": {{"data_dir": tmp}}}})))
    print("ready", flush=True)
ray.shutdown()
"""


def _time_to(cmd: list[str], pattern: str, env: dict[str, str], timeout_s: float = 300
             ) -> float:
    """Seconds from launching ``cmd`` to its first stdout line matching ``pattern``;
    then wait for it to exit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    seen: list[str] = []
    found: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if not found and re.search(pattern, line):
                found.append(time.monotonic() - t0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    reader.join(10)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exit {proc.returncode}:\n"
                           + "".join(seen[-15:]))
    return found[0]


def cold_serve(env_base: dict[str, str]) -> float:
    vela = str(Path(sys.executable).parent / "vela")
    with tempfile.TemporaryDirectory(prefix="vela-bench-serve-") as tmp:
        env = {**env_base, "VELA_SERVER_DATA_DIR": tmp, "VELA_RAY_HEAD_PORT": "6392",
               "VELA_RAY_DASHBOARD_PORT": "8267", "COLUMNS": "200"}
        try:
            return _time_to([vela, "serve", "--detach", "--local-workers", "0"],
                            r"^\s*ready in ", env)
        finally:
            subprocess.run([vela, "stop"], env=env, capture_output=True, timeout=120)


def cold_bare(env: dict[str, str], dashboard: bool) -> float:
    return _time_to([sys.executable, "-c", BARE.format(dash=dashboard)], r"^ready$", env)


MIGRATE = r"""
import asyncio, tempfile
from vela.config import Settings
from vela.server.context import bootstrap_database
with tempfile.TemporaryDirectory(prefix="vela-bench-bare-") as tmp:
    asyncio.run(bootstrap_database(Settings.model_validate({"server": {"data_dir": tmp}})))
"""
HEAD_PORT = 6393


def cold_head(env: dict[str, str]) -> float:
    """``ray start --head`` (a head that outlives its command, as ``vela serve --detach``
    needs) with the dashboard, then the migrations in a fresh process; the head is then
    stopped by its own session (never ``ray stop``, which stops every Ray here)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    t0 = time.monotonic()
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={HEAD_PORT}",
                        "--dashboard-port=8269", "--include-dashboard=true",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True,
                       timeout=300)
        subprocess.run([sys.executable, "-c", MIGRATE], env=env, check=True,
                       capture_output=True, timeout=300)
        return time.monotonic() - t0
    finally:
        _stop_head(HEAD_PORT)


def _stop_head(port: int) -> None:
    import psutil

    session = None
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "gcs_server" in cmd and f"--gcs_server_port={port}" in cmd:
            m = re.search(r"session_[0-9_\-]+", cmd)
            session = m.group(0) if m else None
    needles = [f":{port} ", f":{port}\n", f"--address=127.0.0.1:{port}"]
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or []) + "\n"
        if (session and session in cmd) or any(n in cmd for n in needles) or re.search(
                rf"--address=[0-9.]+:{port}\b", cmd):
            procs.append(p)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def measure_cold(repeats: int) -> dict[str, list[float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VELA_")}
    runs: dict[str, list[float]] = {"vela serve --detach --local-workers 0": [],
                                    "bare ray.init (dashboard) + migrations": [],
                                    "bare ray.init (no dashboard) + migrations": [],
                                    "ray start --head (dashboard) + migrations": []}
    for i in range(repeats):
        say(f"cold start {i + 1}/{repeats}")
        runs["bare ray.init (dashboard) + migrations"].append(cold_bare(env, True))
        runs["vela serve --detach --local-workers 0"].append(cold_serve(env))
        runs["bare ray.init (no dashboard) + migrations"].append(cold_bare(env, False))
        runs["ray start --head (dashboard) + migrations"].append(cold_head(env))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy-builds", type=int, default=4)
    p.add_argument("--skip-serve", action="store_true")
    args = p.parse_args(argv)

    from vela.cli.serve_cmd import ensure_ray_auth_token

    ensure_ray_auth_token()  # Ray's token authentication stays on, on a fresh machine too
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    try:
        memory = measure_memory(args.busy_builds)
    finally:
        ray.shutdown()
    cold: dict[str, list[float]] = {} if args.skip_serve else measure_cold(args.repeats)

    ok = True
    print(f"footprint: {os.cpu_count()} cores")
    print(f"\n{'process':<40} {'RSS MB':>8} {'USS MB':>8}")
    for name, (rss, uss) in memory.items():
        print(f"{name:<40} {rss:>8.1f} {uss:>8.1f}")
    idle = memory["WorkerActor idle (registered)"][0]
    floor = memory["empty Ray actor (floor)"][0]
    print(f"idle WorkerActor / empty actor RSS = {idle / floor:.2f}")
    ok_mem = idle <= IDLE_TARGET_MB
    ok &= ok_mem
    lines = [(f"idle WorkerActor RSS {idle:.0f} MB (target <= {IDLE_TARGET_MB:.0f} MB)",
              ok_mem)]
    if cold:
        print(f"\n{'cold start to ready':<44} {'median s':>9} {'min s':>7} {'max s':>7}")
        for name, xs in cold.items():
            print(f"{name:<44} {statistics.median(xs):>9.2f} {min(xs):>7.2f} {max(xs):>7.2f}")
        serve = statistics.median(cold["vela serve --detach --local-workers 0"])
        bare = statistics.median(cold["bare ray.init (dashboard) + migrations"])
        bare0 = statistics.median(cold["bare ray.init (no dashboard) + migrations"])
        head = statistics.median(cold["ray start --head (dashboard) + migrations"])
        print(f"vela serve / bare (dashboard) = {serve / bare:.2f};  "
              f"vela serve / bare (no dashboard) = {serve / bare0:.2f};  "
              f"vela serve / ray start --head = {serve / head:.2f}")
        ok_cold = serve / bare <= COLD_TARGET
        ok &= ok_cold
        lines.append((f"cold start {serve:.1f}s vs bare ray.init + migrations {bare:.1f}s = "
                      f"{serve / bare:.2f}x (target <= {COLD_TARGET})", ok_cold))
    print("\ntargets")
    for text, good in lines:
        print(f"  [{'PASS' if good else 'FAIL'}] {text}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
