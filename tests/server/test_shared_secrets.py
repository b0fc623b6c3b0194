"""A team's (shared) secret named in a pipeline, end to end through the server's logic:
it reaches the step of a repo on its allowlist, masked; another repo's build ends
``missing_secret`` and says why, as for a repo secret that does not exist."""

from __future__ import annotations

import base64

from tests.server.test_server import logs_of

VALUE = "t3am-Deploy-Value-77"

DEPLOY = """
version: "1"
steps:
  - name: deploy
    commands:
      - echo "deploying with $DEPLOY_TOKEN"
      - printf %s "$DEPLOY_TOKEN" | base64
      - test "$TOKEN" = repo-token
    secrets:
      - token
      - key: acme/ops/token
        type: shared
        target: DEPLOY_TOKEN
"""


async def test_a_shared_secret_reaches_an_allowed_repos_step_masked(system):
    await system.store.put_secret("shared", "acme", "ops", "token", VALUE,
                                  repo_allowlist=["acme/app"])
    await system.add_worker("w1")
    # A repo secret of the same name is a secret of its own, set as $TOKEN.
    build_id = await system.submit(DEPLOY, repo="acme/app", secrets={"token": "repo-token"})
    build = (await system.pump([build_id]))[build_id]
    assert build.status == "success", (build.reason, build.message)
    text = await logs_of(system, build_id)
    assert "deploying with ***" in text
    assert VALUE not in text and base64.b64encode(VALUE.encode()).decode() not in text


async def test_a_repo_not_on_the_allowlist_gets_a_clear_missing_secret(system):
    await system.store.put_secret("shared", "acme", "ops", "token", VALUE,
                                  repo_allowlist=["acme/app"])
    await system.add_worker("w1")
    ids = [await system.submit(DEPLOY, repo=repo, secrets={"token": "repo-token"})
           for repo in ("acme/other", "evil/app")]
    builds = await system.pump(ids)
    for build in builds.values():
        assert (build.status, build.reason) == ("error", "missing_secret")
        assert build.message.startswith("secrets not provided: acme/ops/token")
        assert "allowlist" in build.message and VALUE not in build.message
        assert VALUE not in await logs_of(system, build.id)
