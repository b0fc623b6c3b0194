"""The CLI client through the real API (uvicorn in the harness): login, builds,
workers, secrets, status; credentials stay in a file only the user can read."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from tests.api.conftest import WORKER
from tests.server.conftest import HELLO, pipeline
from vela.api.client import Credentials, load_credentials, save_credentials
from vela.cli import app
from vela.errors import VelaError

SECRET = "cli-S3cret-value"


@pytest.fixture
def cli(harness, tmp_path):
    creds = tmp_path / "creds" / "credentials.json"
    env = {"VELA_CONFIG": "", "VELA_SERVER_DATA_DIR": str(tmp_path),
           "VELA_API_CREDENTIALS_FILE": str(creds), "VELA_API_URL": "",
           "VELA_CREDENTIAL": ""}
    runner = CliRunner()

    def run(*args: str, input: str | None = None, **extra: str):
        return runner.invoke(app, list(args), env={**env, **extra}, input=input)

    run.creds = creds  # type: ignore[attr-defined]
    return run


def _login(cli, harness):
    r = cli("login", "--url", harness.url, VELA_CREDENTIAL=harness.credential)
    assert r.exit_code == 0, r.output
    return r


def test_login_writes_private_credentials(cli, harness):
    r = _login(cli, harness)
    assert "logged in to" in r.output and "as admin" in r.output
    assert cli.creds.stat().st_mode & 0o777 == 0o600
    assert cli.creds.parent.stat().st_mode & 0o077 == 0
    saved = load_credentials(cli.creds)
    assert saved is not None and saved.url == harness.url and saved.scopes == ("admin",)
    assert harness.credential not in cli.creds.read_text()
    # The credential may come from stdin too, and a token may be narrower.
    r = cli("login", "--url", harness.url, "--credential-stdin", "--scopes", "builds:read",
            "--ttl", "1h", input=harness.credential + "\n")
    assert r.exit_code == 0, r.output
    assert load_credentials(cli.creds).scopes == ("builds:read",)
    r = cli("workers")
    assert r.exit_code == 1 and "workers:read" in r.output


def test_login_refuses_a_wrong_credential(cli, harness):
    r = cli("login", "--url", harness.url, VELA_CREDENTIAL="vac_wrong")
    assert r.exit_code == 1 and "wrong credential" in r.output
    assert not cli.creds.exists()


def test_commands_without_login_say_how(cli, harness):
    r = cli("build", "list", VELA_API_URL=harness.url)
    assert r.exit_code == 1 and "vela login" in r.output


def test_unreachable_api_is_one_line(cli):
    r = cli("status", VELA_API_URL="http://127.0.0.1:9")
    assert r.exit_code == 1 and "cannot reach the API" in r.output


def test_credentials_readable_by_others_are_refused(tmp_path):
    path = tmp_path / "c.json"
    save_credentials(path, Credentials(url="http://x", token="t"))
    os.chmod(path, 0o644)
    with pytest.raises(VelaError, match="readable by others"):
        load_credentials(path)


def test_files_that_are_not_utf8_are_one_line_errors(cli, tmp_path):
    binary = tmp_path / "key.bin"
    binary.write_bytes(b"\xff\xfe\x00key")
    r = cli("build", "submit", str(binary), "--repo", "cli/app")
    assert r.exit_code == 1
    assert f"error: {binary} is not UTF-8 text (at byte offset 0): save it as UTF-8" in r.output
    r = cli("secret", "add", "key", "--repo", "cli/app", "--value-file", str(binary))
    assert r.exit_code == 1
    assert f"error: {binary} is not UTF-8 text" in r.output and "`base64`" in r.output


def test_submit_follow_secrets_and_logs(cli, harness, tmp_path):
    _login(cli, harness)
    r = cli("secret", "add", "api_token", "--repo", "cli/app", "--value-stdin",
            input=SECRET + "\n")
    assert r.exit_code == 0 and "added" in r.output, r.output
    r = cli("secret", "add", "api_token", "--repo", "cli/app", "--value-stdin",
            input=SECRET + "\n")
    assert r.exit_code == 0 and "updated" in r.output, r.output
    listed = cli("secret", "list", "--repo", "cli/app", "--json")
    assert [s["name"] for s in json.loads(listed.output)] == ["api_token"]
    assert SECRET not in listed.output

    hello = tmp_path / "hello.yml"
    hello.write_text(HELLO)
    r = cli("build", "submit", str(hello), "--repo", "cli/app", "--follow")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "queued (cli/app #1)" in out and "step 1 greet: success" in out
    assert "[1] token is ***" in out and SECRET not in out
    build_id = int(out.split("build ", 1)[1].split()[0])
    assert f"build {build_id} success" in out
    # Logs come after the step progress.
    assert out.index("step 2 check: success") < out.index("[1] token is ***")

    shown = json.loads(cli("build", "show", str(build_id), "--json").output)
    assert shown["status"] == "success" and [s["name"] for s in shown["steps"]] == \
        ["greet", "check"]
    table = cli("build", "show", str(build_id))
    assert table.exit_code == 0 and "greet" in table.output
    logs = cli("build", "logs", str(build_id), "--step", "2")
    assert logs.exit_code == 0 and "[2] done" in logs.output and "[1]" not in logs.output
    followed = cli("build", "logs", str(build_id), "--follow")
    assert followed.exit_code == 0 and "[1] token is ***" in followed.output

    r = cli("secret", "rm", "api_token", "--repo", "cli/app")
    assert r.exit_code == 0 and "deleted" in r.output
    assert json.loads(cli("secret", "list", "--repo", "cli/app", "--json").output) == []
    r = cli("secret", "list")
    assert r.exit_code == 1 and "--repo" in r.output


def test_shared_secrets_with_their_allowlist(cli, harness):
    _login(cli, harness)
    r = cli("secret", "add", "deploy_key", "--team", "cli/ops", "--allow", "cli/web",
            "--allow", "cli/api", "--value-stdin", input=SECRET + "\n")
    assert r.exit_code == 0 and "added (team cli/ops" in r.output, r.output
    listed = json.loads(cli("secret", "list", "--team", "cli/ops", "--json").output)
    assert [(s["name"], s["repo_allowlist"]) for s in listed] == [
        ("deploy_key", ["cli/api", "cli/web"])]
    table = cli("secret", "list", "--team", "cli/ops")
    assert table.exit_code == 0 and "cli/api" in table.output and SECRET not in table.output
    # Added again without --allow, the allowlist stays; with it, it is replaced.
    r = cli("secret", "add", "deploy_key", "--team", "cli/ops", "--value-stdin",
            input=SECRET + "\n")
    assert r.exit_code == 0 and "updated" in r.output, r.output
    r = cli("secret", "add", "deploy_key", "--team", "cli/ops", "--allow", "cli/web",
            "--value-stdin", input=SECRET + "\n")
    assert r.exit_code == 0, r.output
    listed = json.loads(cli("secret", "list", "--team", "cli/ops", "--json").output)
    assert listed[0]["repo_allowlist"] == ["cli/web"]
    r = cli("secret", "add", "k", "--repo", "cli/web", "--allow", "cli/web",
            "--value-stdin", input="v\n")
    assert r.exit_code == 1 and "--allow" in r.output and "--team" in r.output
    r = cli("secret", "add", "k", "--team", "cli", "--value-stdin", input="v\n")
    assert r.exit_code == 1 and "org/team" in r.output
    r = cli("secret", "rm", "deploy_key", "--team", "cli/ops")
    assert r.exit_code == 0 and "deleted" in r.output
    assert json.loads(cli("secret", "list", "--team", "cli/ops", "--json").output) == []


def test_a_shared_secrets_allowlist_can_be_emptied_from_the_cli(cli, harness):
    """Left out, --allow keeps an updated secret's list; --allow-none empties it (no
    repo's builds get the secret), as the API's `"repo_allowlist": []` does."""
    _login(cli, harness)
    r = cli("secret", "add", "deploy_key", "--team", "cli/ops", "--allow", "cli/web",
            "--value-stdin", input=SECRET + "\n")
    assert r.exit_code == 0, r.output
    r = cli("secret", "add", "deploy_key", "--team", "cli/ops", "--allow-none",
            "--value-stdin", input=SECRET + "\n")
    assert r.exit_code == 0 and "updated (team cli/ops, for no repo)" in r.output, r.output
    listed = json.loads(cli("secret", "list", "--team", "cli/ops", "--json").output)
    assert listed[0]["repo_allowlist"] == []
    for args in (("--team", "cli/ops", "--allow", "cli/web", "--allow-none"),
                 ("--repo", "cli/web", "--allow-none")):
        r = cli("secret", "add", "k", *args, "--value-stdin", input="v\n")
        assert r.exit_code == 1 and "--allow-none" in r.output, r.output


def test_failing_build_exit_code_list_cancel_restart(cli, harness, tmp_path):
    _login(cli, harness)
    failing = tmp_path / "failing.yml"
    failing.write_text(pipeline("echo about to fail", "exit 3"))
    r = cli("build", "submit", str(failing), "--repo", "cli/fail", "--follow", "--json")
    assert r.exit_code == 1
    final = json.loads(r.output)
    assert final["status"] == "failure"

    slow = tmp_path / "slow.yml"
    slow.write_text(pipeline("sleep 60"))
    r = cli("build", "submit", str(slow), "--repo", "cli/fail", "--json")
    assert r.exit_code == 0, r.output
    slow_id = json.loads(r.output)["id"]
    r = cli("build", "cancel", str(slow_id))
    assert r.exit_code == 0 and f"build {slow_id} canceled" in r.output
    r = cli("build", "cancel", str(slow_id))
    assert r.exit_code == 1 and "ended already" in r.output

    listed = json.loads(cli("build", "list", "--repo", "cli/fail", "--json").output)
    assert [b["status"] for b in listed] == ["canceled", "failure"]
    only = json.loads(cli("build", "list", "--repo", "cli/fail", "--status", "failure",
                          "--json").output)
    assert [b["id"] for b in only] == [final["id"]]
    table = cli("build", "list", "--repo", "cli/fail")
    assert table.exit_code == 0 and "canceled" in table.output

    r = cli("build", "restart", str(final["id"]), "--follow")
    assert r.exit_code == 1 and f"restart of {final['id']}" in r.output
    assert "failure" in r.output


def test_workers_and_status(cli, harness):
    _login(cli, harness)
    rows = json.loads(cli("workers", "--json").output)
    assert [w["hostname"] for w in rows] == [WORKER]
    table = cli("workers")
    assert table.exit_code == 0 and WORKER in table.output and "/2" in table.output
    r = cli("workers", "--deactivate", WORKER)
    assert r.exit_code == 0 and "deactivated" in r.output and "inactive" in r.output
    r = cli("workers", "--activate", WORKER, "--json")
    assert r.exit_code == 0 and json.loads(r.output)[0]["active"] is True
    status = json.loads(cli("status", "--json").output)
    assert status["api"] == harness.url and status["workers"]["connected"] == 1
    r = cli("status")
    assert r.exit_code == 0 and "queue (database)" in r.output


def test_token_create_and_revoke(cli, harness):
    _login(cli, harness)
    r = cli("token", "create", "ci-cli", "--scopes", "builds:read", "--ttl", "1h", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["subject"] == "ci-cli" and out["scopes"] == ["builds:read"]
    ci = {"VELA_API_CREDENTIALS_FILE": str(cli.creds.parent / "ci.json")}
    save_credentials(cli.creds.parent / "ci.json",
                     Credentials(url=harness.url, token=out["token"], subject="ci-cli",
                                 scopes=("builds:read",), expires_at=out["expires_at"]))
    assert cli("build", "list", **ci).exit_code == 0
    r = cli("token", "revoke", "ci-cli")
    assert r.exit_code == 0 and "revoked" in r.output, r.output
    r = cli("build", "list", **ci)
    assert r.exit_code == 1 and "token_revoked" in r.output
    assert "Traceback" not in r.output
