"""Every endpoint family over the in-process server: builds (create, list, get,
steps, logs, follow, cancel, restart), repos, workers, secrets, registration
tokens, queue stats and status; validation errors name the field."""

from __future__ import annotations

import json
import time

import pytest

from tests.api.conftest import WORKER, bearer
from tests.server.conftest import HELLO, pipeline

SECRET = "api-S3cret-value"
TERMINAL = {"success", "failure", "error", "killed", "canceled"}


def wait_for(client, admin, build_id: int, cond, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        b = client.get(f"/api/v1/builds/{build_id}", headers=admin).json()
        if cond(b):
            return b
        assert time.monotonic() < deadline, f"timed out: {b}"
        time.sleep(0.05)


def create(client, admin, repo: str, text: str, **body) -> dict:
    r = client.post(f"/api/v1/repos/{repo}/builds", headers=admin,
                    json={"pipeline": text, **body})
    assert r.status_code == 201, r.text
    return r.json()


def test_build_runs_with_secret_masked_and_follow_streams_to_the_end(client, admin):
    r = client.post("/api/v1/secrets/native/repo/acme/web", headers=admin,
                    json={"name": "api_token", "value": SECRET})
    assert r.status_code == 201, r.text
    b = create(client, admin, "acme/web", HELLO)
    assert (b["repo"], b["number"], b["status"]) == ("acme/web", 1, "pending")
    with client.stream("GET", f"/api/v1/builds/{b['id']}/logs", params={"follow": "true"},
                       headers=admin) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "build" and kinds[-1] == "end"
    assert events[-1]["status"] == "success"
    assert {e["step"]["name"] for e in events if e["event"] == "step"} == {"greet", "check"}
    text = "".join(e["text"] for e in events if e["event"] == "log")
    assert "token is ***" in text and SECRET not in text
    # The same build, Vela's way (repo + number) and by id.
    by_number = client.get("/api/v1/repos/acme/web/builds/1", headers=admin).json()
    by_id = client.get(f"/api/v1/builds/{b['id']}", headers=admin).json()
    assert by_number == by_id and by_id["status"] == "success" and by_id["worker"] == WORKER
    assert [s["status"] for s in by_id["steps"]] == ["success", "success"]
    logs = client.get("/api/v1/repos/acme/web/builds/1/logs", headers=admin).json()
    assert "".join(c["text"] for c in logs) == text
    step2 = client.get("/api/v1/repos/acme/web/builds/1/steps/2/logs", headers=admin).json()
    assert [c["step"] for c in step2] == [2] and "done" in step2[0]["text"]
    steps = client.get(f"/api/v1/builds/{b['id']}/steps", headers=admin).json()
    assert [s["name"] for s in steps] == ["greet", "check"]
    assert client.get(f"/api/v1/builds/{b['id']}/steps/2", headers=admin).json()["name"] \
        == "check"
    assert client.get(f"/api/v1/builds/{b['id']}/steps/9", headers=admin).status_code == 404
    # A follow of a finished build replays it and ends at once.
    r = client.get(f"/api/v1/builds/{b['id']}/logs?follow=true", headers=admin)
    assert r.text.strip().splitlines()[-1] == json.dumps(
        {"event": "end", "status": "success", "reason": None}, separators=(",", ":"))


def test_list_filters_and_pages(client, admin):
    ids = [create(client, admin, "paging/app", pipeline("true"))["id"] for _ in range(3)]
    failing = create(client, admin, "paging/app", pipeline("exit 3"))["id"]
    for i in [*ids, failing]:
        wait_for(client, admin, i, lambda b: b["status"] in TERMINAL)
    r = client.get("/api/v1/repos/paging/app/builds", headers=admin,
                   params={"per_page": 2, "page": 1})
    assert [b["id"] for b in r.json()] == [failing, ids[2]]
    r = client.get("/api/v1/repos/paging/app/builds", headers=admin,
                   params={"per_page": 2, "page": 2})
    assert [b["id"] for b in r.json()] == [ids[1], ids[0]]
    r = client.get("/api/v1/builds", headers=admin,
                   params={"repo": "paging/app", "status": "failure"})
    assert [b["id"] for b in r.json()] == [failing]
    r = client.get("/api/v1/builds", headers=admin,
                   params=[("repo", "paging/app"), ("status", "failure"),
                           ("status", "success")])
    assert len(r.json()) == 4
    r = client.get("/api/v1/builds", headers=admin, params={"worker": WORKER, "per_page": 100})
    assert failing in [b["id"] for b in r.json()]
    repos = client.get("/api/v1/repos", headers=admin).json()
    assert "paging/app" in [x["full_name"] for x in repos]
    repo = client.get("/api/v1/repos/paging/app", headers=admin).json()
    assert repo["counter"] == 4


def test_cancel_and_restart(client, admin):
    b = create(client, admin, "acme/slow", pipeline("echo started", "sleep 60"))
    wait_for(client, admin, b["id"], lambda x: x["started_at"] is not None)
    r = client.delete(f"/api/v1/repos/acme/slow/builds/{b['number']}/cancel", headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"
    again = client.delete(f"/api/v1/builds/{b['id']}/cancel", headers=admin)
    assert again.status_code == 409 and again.json()["code"] == "conflict"
    r = client.post(f"/api/v1/builds/{b['id']}", headers=admin)
    assert r.status_code == 201, r.text
    restarted = r.json()
    assert restarted["parent_id"] == b["id"] and restarted["number"] == b["number"] + 1
    assert restarted["status"] == "pending"
    client.delete(f"/api/v1/builds/{restarted['id']}/cancel", headers=admin)
    wait_for(client, admin, restarted["id"], lambda x: x["status"] == "canceled")


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("POST", "/api/v1/repos/acme/app/builds", {}, "pipeline"),
    ("POST", "/api/v1/repos/acme/app/builds", {"pipeline": ""}, "pipeline"),
    ("POST", "/api/v1/repos/acme/app/builds", {"pipeline": "x", "timeout_s": 0}, "timeout_s"),
    ("POST", "/api/v1/repos/acme/app/builds", {"pipeline": "x", "timeout_s": 10**400},
     "timeout_s"),
    ("POST", "/api/v1/repos/acme/app/builds", {"pipeline": "x", "extra": 1}, "extra"),
    ("POST", "/api/v1/repos/acme/app/builds", {"pipeline": "x", "route": "a b"}, "route"),
    ("GET", "/api/v1/builds?per_page=1000", None, "per_page"),
    ("GET", "/api/v1/builds?status=bogus", None, "status[0]"),
    ("GET", "/api/v1/builds?repo=noslash", None, "repo"),
    ("GET", "/api/v1/builds/zero", None, "build_id"),
    ("GET", "/api/v1/repos/acme/app/builds/0", None, "number"),
    ("PUT", "/api/v1/workers/api-w1", {"active": "maybe"}, "active"),
    ("POST", "/api/v1/secrets/native/repo/acme/app", {"name": "bad-name", "value": "v"},
     "name"),
    # Longer than a pipeline's `secrets` can name: it could never be used.
    ("POST", "/api/v1/secrets/native/repo/acme/app", {"name": "a" * 129, "value": "v"},
     "name"),
    ("POST", "/api/v1/secrets/native/team/acme/app", {"name": "ok", "value": "v"}, "type"),
    ("POST", "/api/v1/admin/registration-tokens", {"ttl_s": 1}, "ttl_s"),
    # No scope at all is not "every scope".
    ("POST", "/api/v1/login", {"credential": "x", "scopes": []}, "scopes"),
    ("POST", "/api/v1/admin/registration-tokens", {"routes": ["nowhere"]}, "routes"),
])
def test_validation_errors_name_the_field(client, admin, method, path, body, field):
    r = client.request(method, path, json=body, headers=admin)
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["code"] == "validation_failed" and out["field"] == field, out
    assert out["message"].startswith(f"{field}:")


def test_bad_pipeline_and_unknown_route(client, admin):
    r = client.post("/api/v1/repos/acme/app/builds", headers=admin,
                    json={"pipeline": "version: '1'\nsteps:\n  - name: x\n"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_pipeline"
    assert r.json()["field"] == "pipeline" and r.json()["details"]
    huge = "version: '1'\nsteps:\n  - name: x\n    commands: [x]\n    timeout: " + "9" * 400
    r = client.post("/api/v1/repos/acme/app/builds", headers=admin, json={"pipeline": huge})
    assert r.status_code == 422 and r.json()["code"] == "invalid_pipeline", r.text
    r = client.post("/api/v1/repos/acme/app/builds", headers=admin,
                    json={"pipeline": pipeline("true"), "route": "nowhere"})
    assert r.status_code == 400 and r.json()["code"] == "bad_request"
    assert "nowhere" in r.json()["message"]
    r = client.post("/api/v1/repos/acme/app/builds", headers=admin, content=b"{not json",
                    )
    assert r.status_code == 422 and r.json()["code"] == "validation_failed"


def test_not_found_and_unknown_paths(client, admin):
    for path in ("/api/v1/builds/99999", "/api/v1/repos/no/such", "/api/v1/workers/ghost",
                 "/api/v1/repos/no/such/builds/1", "/api/v1/nothing-here"):
        r = client.get(path, headers=admin)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
    r = client.patch("/api/v1/builds", headers=admin)
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


def recording(client, admin):
    """An admin's call that keeps every answer's text, to check none holds a value."""
    seen: list[str] = []

    def call(method, path, **kw):
        r = client.request(method, path, headers=admin, **kw)
        seen.append(r.text)
        return r

    return call, seen


def test_secrets_crud_never_returns_values(client, admin):
    base = "/api/v1/secrets/native/repo/vault/app"
    call, seen = recording(client, admin)
    assert call("POST", base, json={"name": "db_password", "value": SECRET}).status_code == 201
    dup = call("POST", base, json={"name": "db_password", "value": "x"})
    assert dup.status_code == 409 and dup.json()["code"] == "conflict"
    listed = call("GET", base).json()
    assert [s["name"] for s in listed] == ["db_password"]
    assert set(listed[0]) == {"id", "type", "org", "target", "name", "repo_allowlist",
                              "created_at", "updated_at"}
    one = call("GET", f"{base}/db_password").json()
    assert one["type"] == "repo" and one["target"] == "app"
    upd = call("PUT", f"{base}/db_password", json={"value": SECRET + "2"})
    assert upd.status_code == 200
    assert call("PUT", f"{base}/missing", json={"value": "v"}).status_code == 404
    # Org secrets live at org/<org>/*.
    assert call("POST", "/api/v1/secrets/native/org/vault/*",
                json={"name": "shared_key", "value": SECRET}).status_code == 201
    assert [s["name"] for s in call("GET", "/api/v1/secrets/native/org/vault/*").json()] \
        == ["shared_key"]
    assert call("DELETE", f"{base}/db_password").status_code == 204
    assert call("DELETE", f"{base}/db_password").status_code == 404
    assert call("GET", base).json() == []
    assert not any(SECRET in text for text in seen)
    spec = client.get("/api/v1/openapi.json").json()
    assert "value" not in spec["components"]["schemas"]["SecretOut"]["properties"]


def test_shared_secrets_carry_a_repo_allowlist(client, admin):
    base = "/api/v1/secrets/native/shared/vault/ops"
    call, seen = recording(client, admin)
    made = call("POST", base, json={"name": "deploy_key", "value": SECRET,
                                    "repo_allowlist": ["vault/web", "vault/api"]})
    assert made.status_code == 201, made.text
    assert made.json()["repo_allowlist"] == ["vault/api", "vault/web"]
    listed = call("GET", base).json()
    assert [(s["type"], s["target"], s["name"], s["repo_allowlist"]) for s in listed] == [
        ("shared", "ops", "deploy_key", ["vault/api", "vault/web"])]
    # PUT sets the allowlist, the value, or both; what it leaves out stays.
    upd = call("PUT", f"{base}/deploy_key", json={"repo_allowlist": ["vault/web"]})
    assert upd.status_code == 200 and upd.json()["repo_allowlist"] == ["vault/web"]
    upd = call("PUT", f"{base}/deploy_key", json={"value": SECRET + "2"})
    assert upd.status_code == 200 and upd.json()["repo_allowlist"] == ["vault/web"]
    assert call("GET", f"{base}/deploy_key").json()["repo_allowlist"] == ["vault/web"]
    for method, path, body, field in [
        ("PUT", f"{base}/deploy_key", {}, "body"),
        ("POST", base, {"name": "k", "value": "v", "repo_allowlist": ["acme/web"]},
         "repo_allowlist"),
        ("POST", base, {"name": "k", "value": "v", "repo_allowlist": ["web"]},
         "repo_allowlist"),
        ("POST", "/api/v1/secrets/native/repo/vault/web",
         {"name": "k", "value": "v", "repo_allowlist": ["vault/web"]}, "repo_allowlist"),
        ("PUT", "/api/v1/secrets/native/org/vault/*/k", {"repo_allowlist": ["vault/web"]},
         "repo_allowlist"),
    ]:
        r = call(method, path, json=body)
        assert r.status_code == 422 and r.json()["code"] == "validation_failed", r.text
        assert r.json().get("field") == field, r.text
    assert [s["name"] for s in call("GET", base).json()] == ["deploy_key"]
    assert not any(SECRET in text for text in seen)


def test_workers_deactivate_and_activate(client, admin, harness):
    workers = client.get("/api/v1/workers", headers=admin).json()
    assert [w["hostname"] for w in workers] == [WORKER]
    w = workers[0]
    assert w["connected"] and w["active"] and w["routes"] == ["vela"] and w["build_limit"] == 2
    r = client.put(f"/api/v1/workers/{WORKER}", headers=admin, json={"active": False})
    assert r.status_code == 200 and r.json()["active"] is False
    try:
        b = create(client, admin, "acme/idle", pipeline("true"))
        time.sleep(0.5)  # several pump passes: nothing may pick the build up
        assert client.get(f"/api/v1/builds/{b['id']}", headers=admin).json()["status"] \
            == "pending"
    finally:
        r = client.put(f"/api/v1/workers/{WORKER}", headers=admin, json={"active": True})
    assert r.json()["active"] is True
    assert wait_for(client, admin, b["id"], lambda x: x["status"] in TERMINAL)["status"] \
        == "success"
    one = client.get(f"/api/v1/workers/{WORKER}", headers=admin).json()
    assert one["hostname"] == WORKER and one["last_checked_in"]


def test_registration_tokens_queue_stats_and_status(client, admin):
    r = client.post("/api/v1/admin/registration-tokens", headers=admin,
                    json={"hostname": "new-host", "routes": ["gpu"], "ttl_s": 60})
    assert r.status_code == 201, r.text
    tok = r.json()
    assert tok["token"].startswith("vrt_") and tok["routes"] == ["gpu"]
    assert tok["hostname"] == "new-host" and tok["ttl_s"] == 60
    stats = client.get("/api/v1/queue/stats", headers=admin).json()
    assert stats["backend"] == "database" and set(stats["routes"]) >= {"vela", "gpu"}
    assert set(stats["routes"]["vela"]) == {"ready", "in_flight", "dead"}
    status = client.get("/api/v1/status", headers=admin).json()
    assert status["workers"]["connected"] == 1 and status["free_slots"]["vela"] >= 0
    assert set(status["builds"]) == {"pending", "running"}
    assert status["queue"]["backend"] == "database"
    # Writes and calls that may carry several builds' requests are counted.
    create(client, admin, "acme/web", HELLO)
    calls = client.get("/api/v1/status", headers=admin).json()["calls"]
    assert set(calls) == {"authority", "database", "workers"}
    shared = calls["database"]["write_shared"]
    assert 0 < shared["calls"] <= shared["requests"]


def test_real_http_follow_streams_while_the_build_runs(harness):
    """Through uvicorn: events arrive as they happen, not at the end."""
    import httpx

    admin = bearer(harness.token("admin"))
    with httpx.Client(base_url=harness.url, headers=admin, timeout=30) as http:
        b = http.post("/api/v1/repos/acme/live/builds",
                      json={"pipeline": pipeline("echo first", "sleep 1", "echo second")})
        assert b.status_code == 201, b.text
        seen_running_log_at = None
        with http.stream("GET", f"/api/v1/builds/{b.json()['id']}/logs",
                         params={"follow": "true"}) as r:
            for line in r.iter_lines():
                e = json.loads(line)
                if e["event"] == "log" and "first" in e["text"] and seen_running_log_at is None:
                    seen_running_log_at = time.monotonic()
                if e["event"] == "end":
                    ended_at = time.monotonic()
                    assert e["status"] == "success"
        assert seen_running_log_at is not None and ended_at - seen_running_log_at > 0.5
