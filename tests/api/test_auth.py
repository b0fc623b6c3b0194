"""Who may call the API: missing, forged, expired and wrong-type tokens are 401;
a valid token without the scope is 403; the admin credential logs in."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import bearer
from vela.api import create_app
from vela.security import KeyRing, jwk_thumbprint, mint_api_token, mint_build_token

PROTECTED = [
    ("GET", "/api/v1/repos"), ("GET", "/api/v1/builds"), ("GET", "/api/v1/builds/1"),
    ("GET", "/api/v1/builds/1/logs"), ("DELETE", "/api/v1/builds/1/cancel"),
    ("POST", "/api/v1/repos/acme/app/builds"), ("GET", "/api/v1/workers"),
    ("PUT", "/api/v1/workers/api-w1"), ("GET", "/api/v1/secrets/native/repo/acme/app"),
    ("POST", "/api/v1/admin/registration-tokens"), ("GET", "/api/v1/queue/stats"),
    ("GET", "/api/v1/status"), ("GET", "/api/v1/user"), ("POST", "/api/v1/tokens"),
    ("POST", "/api/v1/tokens/revoke"),
]


def _code(r) -> str:
    return r.json()["code"]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_endpoint_needs_a_token(client, method, path):
    r = client.request(method, path, json={})
    assert r.status_code == 401, r.text
    assert _code(r) == "unauthenticated"
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_health_and_ready_need_no_token(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert set(r.json()["checks"]) == {"database", "queue", "scheduler"}


def test_openapi_is_served(client):
    spec = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/repos/{org}/{repo}/builds" in spec["paths"]
    assert "apiToken" in spec["components"]["securitySchemes"]


def _tamper(token: str) -> str:
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scp"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


def test_bad_tokens_are_401_with_their_reason(client, harness):
    now = datetime.now(UTC)
    other_ring = KeyRing.generate(now)
    forged_key, _ = mint_api_token(other_ring, issuer=harness.settings.server.id,
                                   subject="mallory", scopes=["admin"], ttl_s=600, now=now)
    build_token, _ = mint_build_token(
        harness.system.authority.ring, issuer=harness.settings.server.id, build_id=1,
        worker="api-w1", jkt=jwk_thumbprint(harness.system.identity("api-w1").sign_public_key),
        timeout_s=600, grace_s=0, now=now)
    cases = {
        "malformed": "not-a-token",
        "unknown_kid": forged_key,
        "bad_signature": _tamper(harness.token("builds:read")),
        "expired": harness.token("admin", ttl_s=60, now=now - timedelta(hours=1)),
        "not_yet_valid": harness.token("admin", now=now + timedelta(hours=1)),
        "wrong_type": build_token,
        "wrong_issuer": mint_api_token(harness.system.authority.ring, issuer="elsewhere",
                                       subject="x", scopes=["admin"], ttl_s=600,
                                       now=now)[0],
    }
    for reason, token in cases.items():
        r = client.get("/api/v1/workers", headers=bearer(token))
        assert r.status_code == 401, (reason, r.text)
        assert (_code(r), r.json()["reason"]) == ("unauthenticated", reason), r.json()
    # The admin credential and a registration token are not bearer tokens either.
    for token in (harness.credential, "vrt_" + "a" * 40):
        r = client.get("/api/v1/workers", headers=bearer(token))
        assert r.status_code == 401


def test_build_token_never_works_anywhere(client, harness):
    now = datetime.now(UTC)
    build_token, _ = mint_build_token(
        harness.system.authority.ring, issuer=harness.settings.server.id, build_id=1,
        worker="api-w1", jkt=jwk_thumbprint(harness.system.identity("api-w1").sign_public_key),
        timeout_s=600, grace_s=0, now=now)
    for method, path in PROTECTED:
        r = client.request(method, path, json={}, headers=bearer(build_token))
        assert r.status_code == 401, (method, path, r.text)


def test_wrong_scope_is_403(client, harness):
    reader = bearer(harness.token("builds:read"))
    assert client.get("/api/v1/builds", headers=reader).status_code == 200
    for method, path, body in [
        ("POST", "/api/v1/repos/acme/app/builds", {"pipeline": "x"}),
        ("GET", "/api/v1/workers", None),
        ("GET", "/api/v1/secrets/native/repo/acme/app", None),
        ("POST", "/api/v1/secrets/native/repo/acme/app", {"name": "a", "value": "b"}),
        ("POST", "/api/v1/admin/registration-tokens", {}),
        ("POST", "/api/v1/tokens", {"subject": "ci", "scopes": ["admin"]}),
        ("PUT", "/api/v1/workers/api-w1", {"active": False}),
    ]:
        r = client.request(method, path, json=body, headers=reader)
        assert r.status_code == 403, (path, r.text)
        assert _code(r) == "forbidden"
        assert "scope" in r.json()["message"]


def test_login_with_the_admin_credential(client, harness):
    r = client.post("/api/v1/login", json={"credential": harness.credential})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["subject"] == "admin" and out["scopes"] == ["admin"]
    me = client.get("/api/v1/user", headers=bearer(out["token"])).json()
    assert me["subject"] == "admin" and me["scopes"] == ["admin"]
    # A narrower token for a tool.
    r = client.post("/api/v1/login", json={"credential": harness.credential,
                                           "scopes": ["builds:read"], "ttl_s": 120})
    narrow = r.json()
    assert narrow["scopes"] == ["builds:read"]
    assert client.get("/api/v1/workers", headers=bearer(narrow["token"])).status_code == 403


def test_login_refuses_a_wrong_credential(client, harness):
    for credential in ("vac_wrong", harness.credential + "x", "admin"):
        r = client.post("/api/v1/login", json={"credential": credential})
        assert r.status_code == 401 and _code(r) == "bad_credential"
    r = client.post("/api/v1/login", json={"credential": harness.credential,
                                           "scopes": ["root"]})
    assert r.status_code == 422 and r.json()["field"] == "scopes[0]"


def test_admin_mints_scoped_tokens(client, harness, admin):
    r = client.post("/api/v1/tokens", headers=admin,
                    json={"subject": "ci-job", "scopes": ["builds:read", "builds:write"],
                          "ttl_s": 300})
    assert r.status_code == 201, r.text
    tok = r.json()
    assert tok["subject"] == "ci-job" and tok["scopes"] == ["builds:read", "builds:write"]
    assert client.get("/api/v1/builds", headers=bearer(tok["token"])).status_code == 200
    assert client.get("/api/v1/workers", headers=bearer(tok["token"])).status_code == 403


async def test_authenticator_refetches_keys_after_a_rotation():
    from vela.api.auth import Authenticator
    from vela.api.errors import ApiError

    now = datetime.now(UTC)
    old = KeyRing.generate(now)
    new = old.rotated(now=now, verify_until=now + timedelta(hours=1))
    current = {"ring": old}
    loads: list[int] = []
    clock = [0.0]

    async def load_keys():
        loads.append(1)
        return {"issuer": "s", "keys": current["ring"].verifying_keys(now)}

    auth = Authenticator(load_keys, monotonic=lambda: clock[0], min_refresh_s=5)

    def token(ring):
        return mint_api_token(ring, issuer="s", subject="a", scopes=["admin"], ttl_s=600,
                              now=now)[0]

    assert (await auth.authenticate(token(old))).sub == "a"
    current["ring"] = new
    with pytest.raises(ApiError) as e:  # an unknown kid right after a fetch: no refetch yet
        await auth.authenticate(token(new))
    assert e.value.reason == "unknown_kid"
    clock[0] = 10.0
    assert (await auth.authenticate(token(new))).sub == "a"
    assert (await auth.authenticate(token(old))).sub == "a"  # verifies until verify_until
    assert len(loads) == 2


async def test_a_revocation_is_not_undone_by_a_key_fetch_already_under_way():
    """A fetch that read the revocations before a subject was revoked and answers after
    the revocation's forget() must not be cached: the revoked token would work on for
    the cache's lifetime (five minutes)."""
    import asyncio

    from vela.api.auth import Authenticator
    from vela.api.errors import ApiError

    now = datetime.now(UTC)
    ring = KeyRing.generate(now - timedelta(minutes=1))
    revoked: dict[str, float] = {}
    reading, answer = asyncio.Event(), asyncio.Event()
    loads: list[dict[str, float]] = []

    async def load_keys():
        snapshot = dict(revoked)  # the revocations are read first, then the keys: slow
        loads.append(snapshot)
        if len(loads) == 1:
            reading.set()
            await answer.wait()
        return {"issuer": "s", "keys": ring.verifying_keys(now), "revoked": snapshot}

    auth = Authenticator(load_keys)
    leaked = mint_api_token(ring, issuer="s", subject="ci", scopes=["builds:read"],
                            ttl_s=600, now=now - timedelta(seconds=10))[0]
    first = asyncio.create_task(auth.authenticate(leaked))
    await reading.wait()
    revoked["ci"] = now.timestamp()  # POST /tokens/revoke: the row, then forget()
    auth.forget()
    answer.set()
    with pytest.raises(ApiError) as e:  # what finished loading after forget() is not used
        await first
    assert e.value.reason == "token_revoked"
    with pytest.raises(ApiError) as e:
        await auth.authenticate(leaked)
    assert e.value.reason == "token_revoked"
    assert len(loads) == 2


def test_revoked_subjects_tokens_are_refused_new_ones_work(client, harness, admin):
    """A leaked token: the admin revokes its subject. Every token of that subject minted
    before is 401 ``token_revoked`` at once, other subjects' tokens are untouched, a token
    minted afterwards works, and an API process started later knows it too."""
    def mint(subject: str) -> str:
        r = client.post("/api/v1/tokens", headers=admin,
                        json={"subject": subject, "scopes": ["builds:read"]})
        assert r.status_code == 201, r.text
        return r.json()["token"]

    leaked, other = mint("ci-leaky"), mint("ci-other")
    assert client.get("/api/v1/builds", headers=bearer(leaked)).status_code == 200
    reader = harness.token("builds:read", subject="reader")
    r = client.post("/api/v1/tokens/revoke", headers=bearer(reader),
                    json={"subject": "ci-leaky"})
    assert r.status_code == 403  # only an admin may revoke
    r = client.post("/api/v1/tokens/revoke", headers=admin, json={"subject": "ci-leaky"})
    assert r.status_code == 200, r.text
    assert r.json()["subject"] == "ci-leaky"
    refused = client.get("/api/v1/builds", headers=bearer(leaked))
    assert refused.status_code == 401 and refused.json()["reason"] == "token_revoked"
    assert client.get("/api/v1/builds", headers=bearer(other)).status_code == 200
    fresh = mint("ci-leaky")
    assert client.get("/api/v1/builds", headers=bearer(fresh)).status_code == 200
    # Another API process (or this one after a restart) loads the revocation.
    with TestClient(create_app(harness.remote()), raise_server_exceptions=False) as later:
        assert later.get("/api/v1/builds", headers=bearer(leaked)).status_code == 401
        assert later.get("/api/v1/builds", headers=bearer(fresh)).status_code == 200


def test_a_followed_log_ends_when_its_token_is_revoked(client, harness, admin):
    """The token is checked when a stream opens; a build may run for days, so each poll
    checks it again: revoked (or expired) meanwhile, the stream ends with the reason."""
    import json

    r = client.post("/api/v1/tokens", headers=admin,
                    json={"subject": "ci-follower", "scopes": ["builds:read"]})
    leaked = r.json()["token"]
    text = 'version: "1"\nsteps:\n  - name: s\n    commands: ["echo begun", "sleep 20"]\n'
    b = client.post("/api/v1/repos/acme/follow/builds", headers=admin,
                    json={"pipeline": text}).json()
    try:
        with client.stream("GET", f"/api/v1/builds/{b['id']}/logs",
                           params={"follow": "true"}, headers=bearer(leaked)) as stream:
            events, revoked = [], []
            for line in stream.iter_lines():
                if not line:
                    continue
                events.append(json.loads(line))
                if "begun" in events[-1].get("text", "") and not revoked:
                    revoked.append(True)
                    r = client.post("/api/v1/tokens/revoke", headers=admin,
                                    json={"subject": "ci-follower"})
                    assert r.status_code == 200, r.text
        assert "begun" in "".join(e.get("text", "") for e in events)
        assert events[-1]["event"] == "error", events[-3:]
        assert events[-1]["reason"] == "token_revoked"
        assert client.get(f"/api/v1/builds/{b['id']}", headers=admin).json()["status"] \
            == "running"  # the stream ended, not the build
    finally:
        client.delete(f"/api/v1/builds/{b['id']}/cancel", headers=admin)
