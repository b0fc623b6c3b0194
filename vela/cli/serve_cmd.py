"""`vela serve`, `vela stop`, `vela worker`, `vela build run`: the running system.

Ray is imported only here and only when one of these runs, so `vela --help`
stays fast. Without ``ray.address`` the embedded default applies: a local Ray
head on ``ray.head_port`` (not 6379, which is Redis's), started by `vela serve`
and reused by the other commands.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from vela.cli._app import (
    app,
    command,
    console,
    err_console,
    fail,
    follow_again,
    following,
    print_json,
    read_utf8,
    run,
    state,
)
from vela.config import Settings, shown_url
from vela.domain import MAX_BACKLOG
from vela.errors import VelaError

build_app = typer.Typer(help="Run builds.", no_args_is_help=True)
app.add_typer(build_app, name="build")

HEAD_MARKER = "ray-head.started"
# A driver given an address must be told the cluster wants Ray's auth token
# (~/.ray/auth_token) before Ray is first imported; auth stays on.
os.environ.setdefault("RAY_AUTH_MODE", "token")
TERMINAL = {"success", "failure", "error", "killed", "canceled"}


def _address(s: Settings) -> str:
    return s.ray.address or f"127.0.0.1:{s.ray.head_port}"


@dataclasses.dataclass(frozen=True)
class Connection:
    """The cluster this process attached to, as Ray reports it (``ray.address =
    "auto"`` names no host)."""

    started: bool  # we started its local head
    address: str  # host:port of its GCS
    dashboard_url: str  # empty: no dashboard


def _connect(s: Settings, *, head: subprocess.Popen[str] | None = None) -> Connection:
    """Attach this process to the cluster, once ``head`` (a local head being started by
    :func:`_spawn_local_head`) is up."""
    import ray

    started = head is not None
    if head is not None:
        _await_local_head(head)
    elif not s.ray.address and not _head_is_up(s):
        raise VelaError(f"no local Ray head on port {s.ray.head_port}: the server is not "
                        "running; start it with `vela serve`")
    try:
        context = ray.init(address=_address(s), namespace=s.ray.namespace,
                           logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        hint = ("start it with `vela serve`" if not s.ray.address
                else "check ray.address (VELA_RAY_ADDRESS) and that the cluster is up")
        raise VelaError(f"cannot reach Ray at {_address(s)}: {str(e).splitlines()[0]}; "
                        f"{hint}") from None
    if started:
        node = ray._private.worker._global_node  # the session dir names our processes
        assert node is not None  # ray.init returned: this driver is connected
        s.server.data_dir.mkdir(parents=True, exist_ok=True)
        (s.server.data_dir / HEAD_MARKER).write_text(json.dumps(
            {"port": s.ray.head_port, "address": node.address,
             "session": Path(node.get_session_dir_path()).name}))
    dashboard = context.dashboard_url or ""  # host:port, the head's own address for it
    if dashboard and "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    return Connection(started=started, dashboard_url=dashboard,
                      address=ray.get_runtime_context().gcs_address or _address(s))


def _head_is_up(s: Settings) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", s.ray.head_port)) == 0


def _ray_cli() -> str:
    exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if exe is None:
        raise VelaError("the `ray` command is missing; reinstall with `pip install -e .`")
    return exe


def ensure_ray_auth_token() -> None:
    """Ray's token authentication stays on: on a machine that has no token yet
    (``~/.ray/auth_token``), make one, as a local ``ray.init()`` would."""
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the operator chose where the token comes from
    if default.is_file() and default.stat().st_size:
        _private(default)
        return
    res = subprocess.run([_ray_cli(), "get-auth-token", "--generate"], capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:]
        raise VelaError(f"cannot create Ray's auth token: {' '.join(tail)}")
    _private(default)


def _private(token_file: Path) -> None:
    if token_file.is_file() and token_file.stat().st_mode & 0o077:
        token_file.chmod(0o600)  # Ray writes it world-readable; it is the cluster's key


def _spawn_local_head(s: Settings) -> subprocess.Popen[str] | None:
    """Start ``ray start --head`` for the embedded default, without waiting for it (it
    takes seconds: the caller imports and migrates meanwhile); None if there is
    nothing to start (``ray.address`` is set, or our head already runs)."""
    if s.ray.address or _head_is_up(s):
        return None
    console.print(f"starting a local Ray head on port {s.ray.head_port} ...", highlight=False)
    ensure_ray_auth_token()
    cmd = [_ray_cli(), "start", "--head", f"--port={s.ray.head_port}",
           f"--dashboard-port={s.ray.dashboard_port}", "--include-dashboard=true",
           "--disable-usage-stats"]
    # Recorded at once, so `vela stop` finds this head even if starting it fails midway.
    s.server.data_dir.mkdir(parents=True, exist_ok=True)
    (s.server.data_dir / HEAD_MARKER).write_text(json.dumps({"port": s.ray.head_port}))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _await_local_head(head: subprocess.Popen[str]) -> None:
    try:
        out, err = head.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        head.kill()
        head.communicate()
        raise VelaError("`ray start --head` did not finish within 180 s") from None
    if head.returncode != 0:
        tail = "\n".join((err or out).strip().splitlines()[-5:])
        raise VelaError(f"`ray start --head` failed:\n{tail}")


def _stop_local_head(s: Settings) -> None:
    """Stop the head `vela serve` started — only that one (`ray stop` would kill
    every Ray on the machine): its processes name its session directory or its
    address; their children (Ray's workers) go with them."""
    import psutil

    marker = s.server.data_dir / HEAD_MARKER
    if not marker.exists():
        if not s.ray.address and _head_is_up(s):
            err_console.print(
                f"[yellow]the local Ray head on port {s.ray.head_port} was left running: "
                f"there is no {marker}, so `vela serve` did not start it with this "
                "server.data_dir. Run `vela stop` where `vela serve` ran (same directory "
                "and configuration), or `ray stop` if it is the only Ray on this machine "
                "(`ray stop` stops every Ray head here).[/yellow]", highlight=False)
        return
    info = json.loads(marker.read_text())
    needles = ([info["session"], info["address"]] if "session" in info
               else [f":{info['port']} ", f":{info['port']}\n", f"port={info['port']}"])
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and any(n in cmd for n in needles):
            procs[p.pid] = p
            for child in p.children(recursive=True):
                procs[child.pid] = child
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    marker.unlink(missing_ok=True)
    console.print(f"stopped the local Ray head ({len(procs)} processes)")


def _check_modes(s: Settings, *, serve: bool, routes: list[str]) -> None:
    """Refuse a queue-mode split that cannot work before anything starts
    (:mod:`vela.legacy.modes`). `vela serve` checks the server's split and its local
    workers (``routes``); a `vela worker` elsewhere is checked by the server when it
    starts (registration, or the legacy gateway's hello), here only for its secret."""
    from vela.legacy.modes import check_server_modes, check_worker_modes, worker_secret

    if serve:
        check_server_modes(s)
        if routes:
            check_worker_modes(s, routes)
    elif s.worker.mode == "legacy":
        worker_secret(s)


def _check_sandbox(s: Settings) -> None:
    from vela.executor import SandboxUnavailable, choose_runtime

    try:
        runtime = choose_runtime(allow_unsandboxed=s.worker.allow_unsandboxed,
                                 network=s.worker.network)
    except SandboxUnavailable as e:
        raise VelaError(f"workers cannot start: {e}") from None
    if not runtime.sandboxed:
        err_console.print("[bold red]WARNING: build steps will run WITHOUT a sandbox "
                          "(worker.allow_unsandboxed = true).[/bold red]")


def _local_worker(s: Settings, hostname: str, authority: Any) -> dict[str, Any]:
    import ray

    from actors.deploy import start_worker
    from vela.security import load_pinned_server

    state_dir = s.server.data_dir / "workers" / hostname
    if s.worker.mode == "legacy":
        return _start_legacy(s, hostname=hostname, routes=list(s.worker.routes),
                             build_limit=s.worker.build_limit, state_dir=state_dir)
    token = None
    if load_pinned_server(state_dir) is None:
        token = ray.get(authority.registration_token.remote(
            routes=list(s.worker.routes), hostname=hostname, ttl_s=600))
    _, status = start_worker(s, hostname=hostname, routes=list(s.worker.routes),
                             build_limit=s.worker.build_limit, state_dir=state_dir,
                             registration_token=token)
    _say_replaced(hostname, status)
    if not status.get("registered"):
        raise VelaError(f"worker {hostname} did not register: {status.get('error')}")
    return status


def _start_legacy(s: Settings, *, hostname: str, routes: list[str], build_limit: int,
                  state_dir: Path) -> dict[str, Any]:
    """A legacy (worker-pull) worker: classic Vela, kept for migration."""
    from actors.deploy import start_legacy_worker
    from vela.legacy.modes import worker_secret

    _, status = start_legacy_worker(s, hostname=hostname, routes=routes,
                                    build_limit=build_limit, state_dir=state_dir,
                                    worker_secret=worker_secret(s))
    _say_replaced(hostname, status)
    if not status.get("registered"):
        raise VelaError(f"legacy worker {hostname} was not accepted: {status.get('error')}")
    err_console.print(f"[yellow]worker {hostname} runs in legacy queue mode: it pops the "
                      "queue and reads secrets with the shared worker secret "
                      "(docs/migration.md)[/yellow]", highlight=False)
    return status


@app.command("serve")
@command
def serve(
    local_workers: int | None = typer.Option(
        None, "--local-workers", "-w", min=0,
        help="WorkerActors to start on this machine (default: 2 on the embedded default, "
             "0 with ray.address)."),
    detach: bool = typer.Option(False, "--detach", "-d",
                                help="Return once everything is up; stop with `vela stop`."),
) -> None:
    """Start the server (TokenAuthority, Scheduler, QueueListener), local workers and the
    HTTP API.

    Run again with the same settings, it keeps the server running; with other settings
    (another config, database, directory...) it refuses, naming them: `vela stop` first.
    """
    s = state.settings
    n_workers = local_workers if local_workers is not None else (0 if s.ray.address else 2)
    _check_modes(s, serve=True, routes=list(s.worker.routes) if n_workers else [])
    if n_workers:
        _check_sandbox(s)
    t0 = time.monotonic()
    # Ray's head takes seconds to start: it starts first, the libraries load and the
    # migrations run meanwhile.
    head = _spawn_local_head(s)
    try:
        conn, credential = _boot_and_connect(s, head)
    except BaseException:
        if head is not None:
            with contextlib.suppress(Exception):
                head.kill()
                _stop_local_head(s)
        raise
    _start_actors(s, credential, n_workers=n_workers, conn=conn, detach=detach, t0=t0)


def _boot_and_connect(s: Settings, head: subprocess.Popen[str] | None
                      ) -> tuple[Connection, str | None]:
    """Migrate the database (in a thread) while connecting to Ray; a database that is
    not ready, or control actors already running with other settings, stop everything
    before any actor exists. Returns the connection, and the admin credential if this
    boot created it."""
    from vela.server.context import ServerContext

    # The admin credential is shown once: made only when this run goes on to serve.
    serving: concurrent.futures.Future[bool] = concurrent.futures.Future()

    async def boot() -> str | None:
        import asyncio

        from sqlalchemy.exc import DBAPIError

        from vela.api.auth import ensure_admin_credential

        ctx = ServerContext.open(s)
        try:
            await ctx.bootstrap()
            if not await asyncio.wrap_future(serving):
                return None
            return await ensure_admin_credential(ctx.store)
        except (OSError, DBAPIError) as e:
            url = shown_url(s.database_url())
            raise VelaError(f"cannot reach the database at {url} ({type(e).__name__}); "
                            "check database.url (VELA_DATABASE_URL) and that the database "
                            "is running") from None
        finally:
            await ctx.close()

    refused: VelaError | None = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        booted = pool.submit(run, boot())
        try:
            # The actors' modules (and Ray) load while the head starts: ~0.7 s here.
            import actors.api  # noqa: F401
            from actors.deploy import check_control_plane
            conn = _connect(s, head=head)
            try:
                check_control_plane(s)
            except VelaError as e:
                refused = e
            serving.set_result(refused is None)
        finally:
            if not serving.done():
                serving.set_result(False)
            error = booted.exception()
        if error is not None:
            # Nothing of this run exists yet; actors that do belong to a server already
            # running on this cluster, which a failed second `vela serve` leaves alone.
            if conn.started:
                with contextlib.suppress(Exception):
                    import ray

                    ray.shutdown()
                    _stop_local_head(s)
            raise error
        if refused is not None:
            raise refused
    return conn, booted.result()


def _start_actors(s: Settings, credential: str | None, *, n_workers: int, conn: Connection,
                  detach: bool, t0: float) -> None:
    from actors._ray import AUTHORITY
    from actors.api import begin_api
    from actors.deploy import create_control_plane, default_hostname, wait_control_plane

    console.print(f"database ready ({s.database_url().split(':', 1)[0]}), "
                  f"queue: {s.queue.backend}", highlight=False)
    # The HTTP API's actor starts beside the control actors; it is waited for first, as
    # it logs the local CLI in.
    begin_api(s)
    handles = create_control_plane(s)
    api_url = _api_up(s, handles[AUTHORITY], credential)
    wait_control_plane(handles)
    console.print("actors up: TokenAuthority, Scheduler, QueueListener", highlight=False)
    for i in range(1, n_workers + 1):
        hostname = f"{default_hostname()}-{i}"
        status = _local_worker(s, hostname, handles[AUTHORITY])
        console.print(f"worker {hostname} registered (routes {', '.join(status['routes'])}, "
                      f"{_slots(status)}, {status['sandbox']})", highlight=False)
    console.print(f"[green]ready[/green] in {time.monotonic() - t0:.1f}s. API: {api_url}  "
                  f"Ray dashboard: {conn.dashboard_url or 'none'}  (address {conn.address})",
                  highlight=False, soft_wrap=True)
    console.print("try: vela build submit examples/hello.yml --repo demo/hello --follow",
                  highlight=False, soft_wrap=True)
    if detach:
        console.print("detached; stop with `vela stop`")
        return
    console.print("serving; Ctrl-C stops everything")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    _teardown(s, stop_head=conn.started)


def _api_up(s: Settings, authority: Any, credential: str | None) -> str:
    """Wait for the HTTP API. On the embedded default, log the local CLI in
    as admin (a credentials file only this user can read)."""
    import ray

    from actors.api import wait_api
    from vela.api.client import Credentials, save_credentials

    url = wait_api(s)
    console.print(f"API up at {url}", highlight=False)
    if credential:
        console.print(f"admin credential, shown this once (`vela login` exchanges it for an "
                      f"API token): {credential}", highlight=False, soft_wrap=True)
    if not s.ray.address:
        out = ray.get(authority.mint_api_token.remote(subject="admin", scopes=["admin"],
                                                      ttl_s=s.api.token_ttl_s))
        path = s.credentials_path()
        save_credentials(path, Credentials(url=url, token=out["token"], subject="admin",
                                           scopes=tuple(out["scopes"]),
                                           expires_at=out["expires_at"]))
        console.print(f"the local CLI is logged in as admin ({path})", highlight=False)
    return url


def _teardown(s: Settings, *, stop_head: bool) -> None:
    from actors.deploy import stop_all

    stopped = stop_all(s.ray.namespace)
    console.print(f"stopped {len(stopped)} actor(s){': ' if stopped else ''}"
                  f"{', '.join(stopped)}", highlight=False)
    if stop_head:
        import ray

        ray.shutdown()
        _stop_local_head(s)


@app.command("stop")
@command
def stop() -> None:
    """Stop the actors (and the local Ray head `vela serve` started, if any)."""
    s = state.settings
    _connect(s)
    _teardown(s, stop_head=True)


@app.command("worker")
@command
def worker(
    address: str = typer.Option("", "--address",
                                help="Ray cluster address (default: ray.address)."),
    routes: str = typer.Option("", "--routes", "-r", help="Comma-separated routes (default: "
                               "worker.routes)."),
    build_limit: int | None = typer.Option(None, "--build-limit", "-n", min=1,
                                           help="Concurrent builds (default: "
                                                "worker.build_limit)."),
    backlog: int | None = typer.Option(None, "--backlog", min=0, max=MAX_BACKLOG,
                                       help="Builds held beyond the slots, each started when "
                                            "a slot frees; 0 for long builds (default: "
                                            "worker.backlog)."),
    hostname: str = typer.Option("", "--hostname", help="Worker name (default: this host)."),
) -> None:
    """Start this node's WorkerActor on a running cluster.

    Run again, it keeps the worker if it registered with the same settings and replaces
    it otherwise (its registration failed, or it has other routes, limits or settings).

    The first time it needs VELA_WORKER_REGISTRATION_TOKEN (`vela worker-token create`);
    afterwards its key proves who it is. With worker.mode = "legacy" it starts a legacy
    (worker-pull) worker instead, which needs VELA_WORKER_WORKER_SECRET.
    """
    from actors.deploy import default_hostname, start_worker

    s = state.settings
    if address:
        s.ray.address = address
    if backlog is not None:
        s.worker.backlog = backlog
    if build_limit is not None:
        s.worker.build_limit = build_limit
    _check_modes(s, serve=False, routes=[])
    _check_sandbox(s)
    _connect(s)
    name = hostname or s.worker.hostname or default_hostname()
    if s.worker.mode == "legacy":
        status = _start_legacy(
            s, hostname=name,
            routes=[r.strip() for r in routes.split(",") if r.strip()] or list(s.worker.routes),
            build_limit=s.worker.build_limit, state_dir=s.worker.state_dir)
        console.print(f"legacy worker {name} started: routes {', '.join(status['routes'])}, "
                      f"{_slots(status)}", highlight=False)
        return
    token = s.worker.registration_token.get_secret_value() if s.worker.registration_token \
        else None
    _, status = start_worker(
        s, hostname=name,
        routes=[r.strip() for r in routes.split(",") if r.strip()] or list(s.worker.routes),
        build_limit=s.worker.build_limit, state_dir=s.worker.state_dir,
        registration_token=token)
    _say_replaced(name, status)
    if not status.get("registered"):
        raise fail(f"worker {name} did not register: {status.get('error')}")
    console.print(f"worker {name} registered: routes {', '.join(status['routes'])}, "
                  f"{_slots(status)}", highlight=False)


def _say_replaced(name: str, status: dict[str, Any]) -> None:
    if status.get("replaced"):
        err_console.print(f"[yellow]replaced the running worker {name}: "
                          f"{escape(status['replaced'])}[/yellow]", highlight=False)


def _slots(status: dict[str, Any]) -> str:
    """A worker's slots as its status gives them, and the builds it holds beyond."""
    held = f", {status['backlog']} more held" if status.get("backlog") else ""
    return f"{status['build_limit']} slot(s){held}"


def _parse_secret(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise VelaError(f"--secret wants NAME=VALUE, got {name.strip() or '(empty)'}=...")
    return name.strip(), value


def _positive_seconds(value: float) -> float:
    # typer's min= admits its bound, and waiting 0 s gives a build up before it starts.
    if not value > 0:  # NaN too
        raise typer.BadParameter(f"{value:g} is not a positive number of seconds")
    return value


@build_app.command("run")
@command
def build_run(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                help="Pipeline YAML."),
    repo: str = typer.Option(..., "--repo", help="Repository, org/name."),
    secret: list[str] = typer.Option([], "--secret", "-s",
                                     help="NAME=VALUE, stored encrypted for the repo first."),
    route: str = typer.Option("", "--route", help="Queue route (default: the first of "
                              "queue.routes)."),
    as_json: bool = typer.Option(False, "--json", help="Print the finished build as JSON."),
    wait_s: float = typer.Option(3600.0, "--wait", callback=_positive_seconds,
                                 help="Give up waiting after this many seconds."),
) -> None:
    """Create a build from FILE, wait for it, print steps and logs; exit 0 on success."""
    import ray

    from actors._ray import SCHEDULER, get_actor
    from vela.domain import split_repo

    s = state.settings
    split_repo(repo)
    secrets = [_parse_secret(x) for x in secret]
    pipeline = read_utf8(file, "save it as UTF-8")
    _connect(s)
    scheduler = get_actor(SCHEDULER, s.ray.namespace)
    if scheduler is None:
        raise VelaError("the server is not running; start it with `vela serve`")
    for name, value in secrets:
        ray.get(scheduler.put_secret.remote(repo, name, value))
    build_id = ray.get(scheduler.create_build.remote(repo, pipeline,
                                                     route=route or None))
    if not as_json:
        console.print(f"build {build_id} queued ({repo})", highlight=False)
    with following(build_id):
        view = _follow(scheduler, build_id, wait_s, quiet=as_json)
    if as_json:
        print_json(view)
    if view["status"] != "success":
        raise typer.Exit(1)


def _follow(scheduler: Any, build_id: int, wait_s: float, *, quiet: bool) -> dict[str, Any]:
    import ray

    deadline = time.monotonic() + wait_s
    seen: dict[int, str] = {}
    status = ""
    while True:
        view = ray.get(scheduler.build_view.remote(build_id))
        if not quiet:
            if view["status"] != status:
                status = view["status"]
                where = f" on {view['worker']}" if view["worker"] else ""
                console.print(f"build {build_id}: {status}{where}", highlight=False)
            for st in view["steps"]:
                if seen.get(st["number"]) != st["status"]:
                    seen[st["number"]] = st["status"]
                    console.print(f"  step {st['number']} {st['name']}: {st['status']}",
                                  highlight=False)
        if view["status"] in TERMINAL:
            break
        if time.monotonic() > deadline:
            raise VelaError(f"build {build_id} still {view['status']} after {wait_s:.0f}s; "
                            f"{follow_again(build_id)}")
        time.sleep(0.25)
    if not quiet:
        for chunk in view["logs"]:
            for line in chunk["text"].splitlines():
                console.print(f"[{chunk['step']}] {line}", markup=False, highlight=False)
        reason = f" ({view['reason']})" if view["reason"] else ""
        color = "green" if view["status"] == "success" else "red"
        console.print(f"[{color}]build {build_id} {view['status']}{reason}[/{color}]")
    return view

