"""The CLI client of the HTTP API: `vela login`, `vela build submit|list|show|logs|
cancel|restart`, `vela workers`, `vela secret add|list|rm`, `vela status`.

Tables for people, ``--json`` for scripts. The API's URL and token come from the
credentials file (`vela login` writes it; on the embedded default `vela serve`
does), the URL from ``api.url`` when set.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from vela.api.client import (
    ApiClient,
    ClientError,
    Credentials,
    load_credentials,
    save_credentials,
)
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
    state,
)
from vela.cli.duration import parse_duration
from vela.cli.serve_cmd import build_app
from vela.domain import split_repo
from vela.errors import VelaError

TERMINAL = {"success", "failure", "error", "killed", "canceled"}
JSON_OPTION = typer.Option(False, "--json", help="Print JSON.")

secret_app = typer.Typer(help="Secrets of a repo, an org or a team (values are write-only).",
                         no_args_is_help=True)
app.add_typer(secret_app, name="secret")


def _client() -> ApiClient:
    s = state.settings
    creds = load_credentials(s.credentials_path())
    url = s.api.url or (creds.url if creds else s.api.base_url())
    return ApiClient(url, creds.token if creds else None)


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(iso: str | None) -> str:
    if not iso:
        return "never"
    s = int((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds())
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def _took(b: dict[str, Any]) -> str:
    if not b.get("started_at"):
        return ""
    end = datetime.fromisoformat(b["finished_at"]) if b.get("finished_at") \
        else datetime.now(UTC)
    return f"{(end - datetime.fromisoformat(b['started_at'])).total_seconds():.1f}s"


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


# -- login ------------------------------------------------------------------------------

@app.command("login")
@command
def login(
    url: str = typer.Option("", "--url", help="The API (default: api.url, else "
                            "http://api.host:api.port)."),
    credential_stdin: bool = typer.Option(False, "--credential-stdin",
                                          help="Read the admin credential from stdin."),
    scopes: str = typer.Option("", "--scopes", help="Comma-separated scopes (default: all "
                               "of the credential's)."),
    ttl: str = typer.Option("", "--ttl", help="Token lifetime, e.g. 12h, 30d (default: "
                            "api.token_ttl_s)."),
) -> None:
    """Exchange the admin credential (printed by the first `vela serve`) for an API token,
    kept in the credentials file (mode 0600). $VELA_CREDENTIAL is read if set."""
    s = state.settings
    base = (url or s.api.url or s.api.base_url()).rstrip("/")
    credential = os.environ.get("VELA_CREDENTIAL", "")
    if not credential:
        credential = (sys.stdin.readline() if credential_stdin
                      else typer.prompt("admin credential", hide_input=True)).strip()
    body: dict[str, Any] = {"credential": credential}
    if scopes:
        body["scopes"] = [x.strip() for x in scopes.split(",") if x.strip()]
    if ttl:
        body["ttl_s"] = parse_duration(ttl)
    with ApiClient(base) as api:
        out = api.post("/api/v1/login", body)
    path = s.credentials_path()
    save_credentials(path, Credentials(url=base, token=out["token"], subject=out["subject"],
                                       scopes=tuple(out["scopes"]),
                                       expires_at=out["expires_at"]))
    until = datetime.fromtimestamp(out["expires_at"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    _say(f"logged in to {base} as {out['subject']} ({', '.join(out['scopes'])}) until "
         f"{until}; credentials in {path}")


# -- builds ---------------------------------------------------------------------------------

def _without_last_newline(text: str) -> str:
    for end in ("\r\n", "\n"):
        if text.endswith(end):
            return text[:-len(end)]
    return text


# Reconnections in a row, with a growing pause, before `--follow` gives up.
FOLLOW_RETRIES = 5


def _follow(api: ApiClient, build: dict[str, Any], *, quiet: bool,
            live_logs: bool = False, step: int = 0) -> dict[str, Any]:
    """Print status and step changes as they happen, then the logs (only step ``step``'s
    if not 0); the final build. Ctrl-C stops following (:func:`following`)."""
    build_id = build["id"]
    with following(build_id):
        return _follow_build(api, build_id, quiet=quiet, live_logs=live_logs, step=step)


def _follow_build(api: ApiClient, build_id: int, *, quiet: bool,
                  live_logs: bool, step: int) -> dict[str, Any]:
    chunks: list[dict[str, Any]] = []
    after = 0
    ended = False
    lost = 0  # connections lost in a row
    while not ended:  # a dropped stream resumes after the last chunk seen
        if lost > FOLLOW_RETRIES:
            raise ClientError(0, "unreachable", f"lost the API {lost} times in a row while "
                              f"following build {build_id}; {follow_again(build_id)}")
        if lost:
            time.sleep(min(0.5 * 2 ** (lost - 1), 8.0))  # backoff, then resume
        lost += 1
        try:
            for e in api.stream(f"/api/v1/builds/{build_id}/logs", follow="true", after=after):
                lost = 0  # the API answers: losses count again from here
                kind = e["event"]
                if kind == "build" and not quiet:
                    b = e["build"]
                    where = f" on {b['worker']}" if b["worker"] else ""
                    _say(f"build {build_id}: {b['status']}{where}")
                elif kind == "step" and not quiet:
                    st = e["step"]
                    _say(f"  step {st['number']} {st['name']}: {st['status']}")
                elif kind == "log":
                    after = max(after, e["id"])
                    if step and e["step"] != step:
                        continue
                    if live_logs and not quiet:
                        for line in e["text"].splitlines():
                            _say(f"[{e['step']}] {line}")
                    chunks.append(e)
                elif kind == "error":
                    raise ClientError(0, e["code"], e["message"])
                elif kind == "end":
                    ended = True
        except ClientError as e:
            if e.code not in ("unreachable", "unavailable"):
                raise
            err_console.print(f"{str(e).split(';')[0]}; resuming after log {after}",
                              highlight=False)
    final = api.get(f"/api/v1/builds/{build_id}")
    if not quiet:
        if not live_logs:
            for chunk in sorted(chunks, key=lambda c: (c["step"], c["id"])):
                for line in chunk["text"].splitlines():
                    _say(f"[{chunk['step']}] {line}")
        reason = f" ({final['reason']})" if final["reason"] else ""
        color = "green" if final["status"] == "success" else "red"
        console.print(f"[{color}]build {build_id} {final['status']}{reason}[/{color}]",
                      highlight=False)
    return final


@build_app.command("submit")
@command
def build_submit(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                help="Pipeline YAML."),
    repo: str = typer.Option(..., "--repo", help="Repository, org/name."),
    route: str = typer.Option("", "--route", help="Queue route (default: the server's "
                              "first)."),
    timeout: str = typer.Option("", "--timeout", help="Build timeout, e.g. 30m."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Follow the build: steps as "
                                "they change, then the logs; exit 0 only on success."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a build from FILE through the API."""
    org, name = split_repo(repo)
    body: dict[str, Any] = {"pipeline": read_utf8(file, "save it as UTF-8")}
    if route:
        body["route"] = route
    if timeout:
        body["timeout_s"] = parse_duration(timeout)
    with _client() as api:
        build = api.post(f"/api/v1/repos/{org}/{name}/builds", body)
        if not as_json:
            _say(f"build {build['id']} queued ({repo} #{build['number']})")
        if not follow:
            if as_json:
                print_json(build)
            return
        final = _follow(api, build, quiet=as_json)
    if as_json:
        print_json(final)
    if final["status"] != "success":
        raise typer.Exit(1)


@build_app.command("list")
@command
def build_list(
    repo: str = typer.Option("", "--repo", help="Only this repository (org/name)."),
    status: str = typer.Option("", "--status", help="Comma-separated statuses."),
    worker: str = typer.Option("", "--worker", help="Only builds placed on this worker."),
    page: int = typer.Option(1, "--page", min=1),
    per_page: int = typer.Option(20, "--per-page", min=1, max=100),
    as_json: bool = JSON_OPTION,
) -> None:
    """Builds, newest first."""
    params: list[tuple[str, Any]] = [("page", page), ("per_page", per_page)]
    params += [("status", x.strip()) for x in status.split(",") if x.strip()]
    if repo:
        params.append(("repo", repo))
    if worker:
        params.append(("worker", worker))
    with _client() as api:
        builds = api.request("GET", "/api/v1/builds", params=params)
    if as_json:
        print_json(builds)
        return
    table = Table("id", "repo", "#", "status", "worker", "created (UTC)", "took")
    for b in builds:
        table.add_row(str(b["id"]), b["repo"], str(b["number"]), b["status"],
                      b["worker"] or "", _when(b["created_at"]), _took(b))
    console.print(table)


@build_app.command("show")
@command
def build_show(build_id: int = typer.Argument(..., help="Build id."),
               as_json: bool = JSON_OPTION) -> None:
    """One build and its steps."""
    with _client() as api:
        b = api.get(f"/api/v1/builds/{build_id}")
    if as_json:
        print_json(b)
        return
    info = Table(show_header=False)
    for key in ("id", "repo", "number", "status", "reason", "message", "route", "worker",
                "attempts", "parent_id"):
        if b.get(key) is not None:
            info.add_row(key, str(b[key]))
    for key in ("created_at", "started_at", "finished_at"):
        if b.get(key):
            info.add_row(key.replace("_at", ""), _when(b[key]))
    console.print(info)
    steps = Table("#", "step", "status", "exit", "took")
    for st in b["steps"]:
        steps.add_row(str(st["number"]), st["name"], st["status"],
                      "" if st["exit_code"] is None else str(st["exit_code"]), _took(st))
    console.print(steps)


@build_app.command("logs")
@command
def build_logs(
    build_id: int = typer.Argument(..., help="Build id."),
    step: int = typer.Option(0, "--step", min=0, help="Only this step's log."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the build ends; "
                                "exit 0 only on success."),
    as_json: bool = JSON_OPTION,
) -> None:
    """A build's logs (secrets show as ***)."""
    with _client() as api:
        if follow:
            final = _follow(api, {"id": build_id}, quiet=as_json, live_logs=True,
                            step=step)
            if as_json:
                print_json(final)
            if final["status"] != "success":
                raise typer.Exit(1)
            return
        path = f"/api/v1/builds/{build_id}" + (f"/steps/{step}/logs" if step else "/logs")
        chunks = api.get(path)
    if as_json:
        print_json(chunks)
        return
    for chunk in chunks:
        for line in chunk["text"].splitlines():
            _say(f"[{chunk['step']}] {line}")


@build_app.command("cancel")
@command
def build_cancel(build_id: int = typer.Argument(..., help="Build id."),
                 as_json: bool = JSON_OPTION) -> None:
    """Cancel a pending or running build."""
    with _client() as api:
        b = api.delete(f"/api/v1/builds/{build_id}/cancel")
    if as_json:
        print_json(b)
    else:
        _say(f"build {b['id']} {b['status']}")


@build_app.command("restart")
@command
def build_restart(
    build_id: int = typer.Argument(..., help="Build id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Follow the new build."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a build's pipeline again, as a new build of the same repo."""
    with _client() as api:
        b = api.post(f"/api/v1/builds/{build_id}")
        if not as_json:
            _say(f"build {b['id']} queued ({b['repo']} #{b['number']}, restart of {build_id})")
        if not follow:
            if as_json:
                print_json(b)
            return
        final = _follow(api, b, quiet=as_json)
    if as_json:
        print_json(final)
    if final["status"] != "success":
        raise typer.Exit(1)


# -- API tokens -------------------------------------------------------------------------------

token_app = typer.Typer(help="API tokens for tools and CI jobs (admin).", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
@command
def token_create(
    subject: str = typer.Argument(..., help="Who or what uses it, e.g. ci-nightly."),
    scopes: str = typer.Option(..., "--scopes", help="Comma-separated, e.g. "
                               "builds:read,builds:write."),
    ttl: str = typer.Option("", "--ttl", help="Lifetime, e.g. 12h, 30d (default: "
                            "api.token_ttl_s)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Mint an API token; it is printed once and not stored by the server."""
    body: dict[str, Any] = {"subject": subject,
                            "scopes": [x.strip() for x in scopes.split(",") if x.strip()]}
    if ttl:
        body["ttl_s"] = parse_duration(ttl)
    with _client() as api:
        out = api.post("/api/v1/tokens", body)
    if as_json:
        print_json(out)
        return
    console.print(out["token"], highlight=False, soft_wrap=True)
    until = datetime.fromtimestamp(out["expires_at"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    err_console.print(f"for {out['subject']} ({', '.join(out['scopes'])}) until {until}; "
                      f"`vela token revoke {out['subject']}` revokes it", highlight=False)


@token_app.command("revoke")
@command
def token_revoke(
    subject: str = typer.Argument(..., help="Whose tokens to revoke."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Revoke every API token of SUBJECT minted so far; tokens minted afterwards work."""
    with _client() as api:
        out = api.post("/api/v1/tokens/revoke", {"subject": subject})
    if as_json:
        print_json(out)
        return
    _say(f"every token of {out['subject']} minted so far is revoked")


# -- workers ----------------------------------------------------------------------------------

@app.command("workers")
@command
def workers(
    activate: str = typer.Option("", "--activate", metavar="NAME",
                                 help="Let this worker take builds again."),
    deactivate: str = typer.Option("", "--deactivate", metavar="NAME",
                                   help="Give this worker no new builds (running ones go on)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Workers: status, routes, slots used/limit, builds held beyond them, last check-in."""
    with _client() as api:
        for name, active in ((activate, True), (deactivate, False)):
            if name:
                w = api.put(f"/api/v1/workers/{name}", {"active": active})
                if not as_json:
                    _say(f"worker {w['hostname']} {'activated' if active else 'deactivated'}")
        rows = api.get("/api/v1/workers")
    if as_json:
        print_json(rows)
        return
    # A worker with a backlog (worker.backlog) holds builds beyond its slots: its
    # running_builds are both, the ones it runs first.
    held = any(w.get("backlog") for w in rows)
    table = Table("name", "status", "routes", "slots", *(["held"] if held else []),
                  "last check-in", title="workers")
    for w in rows:
        status = w["status"] if w["connected"] else "error (disconnected)"
        if not w["active"]:
            status += ", inactive"
        n, limit = len(w["running_builds"]), w["build_limit"]
        table.add_row(w["hostname"], status, ",".join(w["routes"]), f"{min(n, limit)}/{limit}",
                      *([f"{max(n - limit, 0)}/{w.get('backlog', 0)}"] if held else []),
                      _ago(w["last_checked_in"]))
    console.print(table)
    if not rows:
        err_console.print("no workers registered; `vela worker-token create`, then "
                          "`vela worker` on the worker host")


# -- secrets ------------------------------------------------------------------------------------

def _secret_base(repo: str, org: str, team: str) -> tuple[str, str]:
    if [bool(repo), bool(org), bool(team)].count(True) != 1:
        raise VelaError("name the secret's owner: --repo org/name, --org org or "
                        "--team org/team")
    if repo:
        o, n = split_repo(repo)
        return f"/api/v1/secrets/native/repo/{o}/{n}", f"repo {repo}"
    if team:
        o, sep, t = team.partition("/")
        if not (o and sep and t) or "/" in t:
            raise VelaError(f"--team must look like 'org/team', got {team!r}")
        return f"/api/v1/secrets/native/shared/{o}/{t}", f"team {team}"
    return f"/api/v1/secrets/native/org/{org}/*", f"org {org}"


REPO_OPTION = typer.Option("", "--repo", help="A repository's secret (org/name).")
ORG_OPTION = typer.Option("", "--org", help="An org's secret (every repo of the org).")
TEAM_OPTION = typer.Option("", "--team", help="A team's (shared) secret (org/team); "
                           "a step names it as key: org/team/NAME, type: shared.")


@secret_app.command("add")
@command
def secret_add(
    name: str = typer.Argument(..., help="Name; steps listing it get $NAME in upper case."),
    repo: str = REPO_OPTION,
    org: str = ORG_OPTION,
    team: str = TEAM_OPTION,
    allow: list[str] = typer.Option([], "--allow", help="With --team: a repo (org/name, "
                                    "of the team's org) whose builds may use it; repeat for "
                                    "more. Given, it replaces the list; left out, a new "
                                    "secret reaches no repo and an update keeps the list."),
    allow_none: bool = typer.Option(False, "--allow-none", help="With --team: no repo's "
                                    "builds may use it (empties the list)."),
    value_file: Path | None = typer.Option(None, "--value-file", exists=True, dir_okay=False,
                                           help="Read the value from this file, exactly."),
    value_stdin: bool = typer.Option(False, "--value-stdin", help="Read the value from "
                                     "stdin, less one final newline (as `echo` adds)."),
) -> None:
    """Create or update a secret. Without --value-file/--value-stdin, asks for the value."""
    base, owner = _secret_base(repo, org, team)
    if (allow or allow_none) and not team:
        raise VelaError("--allow and --allow-none are for a team's secret (--team "
                        "org/team): a repo secret goes to its repo, an org secret to every "
                        "repo of the org")
    if allow and allow_none:
        raise VelaError("give --allow or --allow-none, not both")
    if value_file is not None:  # as it is: a key file's last newline is part of it
        value = read_utf8(value_file, "secrets are text; encode a binary value first "
                          "(e.g. with `base64`) and decode it in the step")
    elif value_stdin:  # less the one newline `echo` adds
        value = _without_last_newline(sys.stdin.read())
    else:
        value = typer.prompt(f"value of {name}", hide_input=True)
    allowlist = {"repo_allowlist": allow} if allow or allow_none else {}
    with _client() as api:
        try:
            api.post(base, {"name": name, "value": value, **allowlist})
            verb = "added"
        except ClientError as e:
            if e.code != "conflict":
                raise
            api.put(f"{base}/{name}", {"value": value, **allowlist})
            verb = "updated"
    given = f", for {', '.join(sorted(set(allow))) or 'no repo'}" if allow or allow_none else ""
    _say(f"secret {name} {verb} ({owner}{given})")


@secret_app.command("list")
@command
def secret_list(repo: str = REPO_OPTION, org: str = ORG_OPTION, team: str = TEAM_OPTION,
                as_json: bool = JSON_OPTION) -> None:
    """Secret names and dates, and which repos a team's may reach (values are never
    shown)."""
    base, owner = _secret_base(repo, org, team)
    with _client() as api:
        rows = api.get(base)
    if as_json:
        print_json(rows)
        return
    columns = ["name", "type", "owner", "updated (UTC)"] + (["repos"] if team else [])
    table = Table(*columns, title=f"secrets of {owner}")
    for r in rows:
        repos = [", ".join(r.get("repo_allowlist") or []) or "(none)"] if team else []
        table.add_row(r["name"], r["type"], f"{r['org']}/{r['target']}", _when(r["updated_at"]),
                      *repos)
    console.print(table)


@secret_app.command("rm")
@command
def secret_rm(name: str = typer.Argument(...), repo: str = REPO_OPTION,
              org: str = ORG_OPTION, team: str = TEAM_OPTION) -> None:
    """Delete a secret."""
    base, owner = _secret_base(repo, org, team)
    with _client() as api:
        api.delete(f"{base}/{name}")
    _say(f"secret {name} deleted ({owner})")


# -- status ------------------------------------------------------------------------------------

@app.command("status")
@command
def status(as_json: bool = JSON_OPTION) -> None:
    """The system at a glance: API, actors, queue depth, workers, builds."""
    with _client() as api:
        try:
            api.get("/health")
        except ClientError as e:
            raise fail(str(e)) from None
        data = api.get("/api/v1/status")
        data["api"] = api.base_url
    if as_json:
        print_json(data)
        return
    w = data["workers"]
    by = ", ".join(f"{k} {v}" for k, v in w["by_status"].items() if v) or "none"
    table = Table(show_header=False, title=f"vela ({data['server']})")
    table.add_row("API", f"{data['api']} (up)")
    if "actors" in data:
        table.add_row("actors", ", ".join(data["actors"]) or "none")
    table.add_row("workers", f"{w['connected']} connected of {w['registered']} registered "
                  f"({by}; {w['inactive']} inactive)")
    table.add_row("free slots", ", ".join(f"{r} {n}" for r, n in data["free_slots"].items())
                  or "none")
    q = data["queue"]
    table.add_row(f"queue ({q['backend']})", ", ".join(
        f"{r}: {d['ready']} ready, {d['in_flight']} in flight, {d['dead']} dead"
        for r, d in q["routes"].items()))
    table.add_row("builds", ", ".join(f"{k} {v}" for k, v in data["builds"].items()))
    console.print(table)
