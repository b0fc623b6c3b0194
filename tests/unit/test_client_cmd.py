"""The CLI client: `--follow` survives a dropped connection (it resumes after the last log
it printed, docs/api.md, and gives up with a next step only after several failures in a
row), Ctrl-C stops following a build but not the build, and `secret add` keeps a value's
own newlines."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from vela.api.client import ApiClient, ClientError
from vela.cli import client_cmd


def _chunk(event: dict) -> bytes:
    line = (json.dumps(event) + "\n").encode()
    return f"{len(line):x}\r\n".encode() + line + b"\r\n"


class Api(BaseHTTPRequestHandler):
    """Build 7's log stream: the first connection drops after log 41 (no last chunk);
    later ones end the build. With ``drop_always`` every one drops before any event."""

    protocol_version = "HTTP/1.1"
    asked_after: list[str] = []
    drop_always = False
    quiet_drops = 0  # connections that bring a step event, then drop

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        url = urlparse(self.path)
        if url.path == "/api/v1/builds/7":
            body = json.dumps({"id": 7, "status": "success", "reason": None}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        after = parse_qs(url.query)["after"][0]
        self.asked_after.append(after)
        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        if len(self.asked_after) <= self.quiet_drops:
            self.wfile.write(_chunk({"event": "step", "step": {"number": 1, "name": "s",
                                                               "status": "running"}}))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if after == "0" or self.drop_always:
            if not self.drop_always:  # a quiet drop: before any event
                self.wfile.write(_chunk({"event": "log", "id": 41, "step": 1, "text": "hi\n"}))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # dropped mid-stream
            return
        self.wfile.write(_chunk({"event": "end", "status": "success", "reason": None}))
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def api(monkeypatch) -> Iterator[ApiClient]:
    monkeypatch.setattr(client_cmd.time, "sleep", lambda s: None)  # the backoff's pauses
    Api.asked_after = []  # class state: a fresh list per test
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with ApiClient(f"http://127.0.0.1:{server.server_port}", "token") as client:
            yield client
    finally:
        server.shutdown()


def test_follow_resumes_after_the_last_log_when_the_connection_drops(api):
    final = client_cmd._follow(api, {"id": 7}, quiet=True)
    assert final["status"] == "success"
    assert Api.asked_after == ["0", "41"]


def test_follow_of_a_quiet_build_survives_answered_reconnections(api, monkeypatch):
    """A proxy that drops idle streams: each reconnection is answered (a step event), no
    log comes; that is no lost API."""
    monkeypatch.setattr(Api, "quiet_drops", client_cmd.FOLLOW_RETRIES + 3)
    final = client_cmd._follow(api, {"id": 7}, quiet=True)
    assert final["status"] == "success"
    assert len(Api.asked_after) > client_cmd.FOLLOW_RETRIES + 3


def test_follow_gives_up_after_several_drops_in_a_row(api, monkeypatch):
    monkeypatch.setattr(Api, "drop_always", True)
    with pytest.raises(ClientError) as e:
        client_cmd._follow(api, {"id": 7}, quiet=True)
    assert "vela build logs 7 --follow" in str(e.value)
    assert Api.asked_after == ["0"] * (client_cmd.FOLLOW_RETRIES + 1)


def test_a_secret_from_stdin_loses_one_final_newline_only():
    """`echo value |` adds one newline; a value's own (a key file's last line, a blank
    line that matters) are kept — all of them used to be stripped."""
    strip = client_cmd._without_last_newline
    assert strip("s3cr3t\n") == "s3cr3t" and strip("s3cr3t\r\n") == "s3cr3t"
    assert strip("a\n\n") == "a\n" and strip("-----END KEY-----\n\n") == "-----END KEY-----\n"
    assert strip("no newline") == "no newline"


class _InterruptedApi:
    """An API client whose log stream is cut by Ctrl-C after the first event."""

    def __enter__(self) -> _InterruptedApi:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def post(self, path: str, body: object = None) -> dict:
        return {"id": 7, "number": 3, "repo": "a/b"}

    def stream(self, path: str, **params: object) -> Iterator[dict]:
        yield {"event": "build", "build": {"status": "running", "worker": "w1"}}
        raise KeyboardInterrupt


class _Method:
    """A Ray actor method whose ``remote()`` returns ``result`` as its ref."""

    def __init__(self, result: object) -> None:
        self.result = result

    def remote(self, *a: object, **kw: object) -> object:
        return self.result


def _interrupted_build_run(monkeypatch) -> None:
    """`vela build run` against a Scheduler that queues build 7; Ctrl-C while watching."""
    import types

    import ray

    import actors._ray
    from vela.cli import serve_cmd

    def get(ref: object) -> object:
        if ref is KeyboardInterrupt:
            raise KeyboardInterrupt
        return ref

    scheduler = types.SimpleNamespace(create_build=_Method(7),
                                      build_view=_Method(KeyboardInterrupt))
    monkeypatch.setattr(serve_cmd, "_connect", lambda s, **kw: None)
    monkeypatch.setattr(actors._ray, "get_actor", lambda name, ns: scheduler)
    monkeypatch.setattr(ray, "get", get)


@pytest.mark.parametrize(("args", "shown"), [
    (["build", "submit", "{pipeline}", "--repo", "a/b", "--follow"], "build 7: running on w1"),
    (["build", "logs", "7", "--follow"], "build 7: running on w1"),
    (["build", "restart", "6", "--follow"], "build 7: running on w1"),
    (["build", "run", "{pipeline}", "--repo", "a/b"], "build 7 queued (a/b)"),
])
def test_ctrl_c_stops_following_not_the_build(monkeypatch, tmp_path, args, shown):
    """Ctrl-C while following (through the API, or `vela build run` through the actors):
    one line on stderr says the build carries on and how to follow it again, exit 130
    (the shell's status for SIGINT), no traceback."""
    from typer.testing import CliRunner

    from vela.cli import app

    pipeline = tmp_path / "p.yml"
    pipeline.write_text("steps: []\n")
    monkeypatch.setattr(client_cmd, "_client", _InterruptedApi)
    _interrupted_build_run(monkeypatch)
    r = CliRunner().invoke(app, [a.format(pipeline=pipeline) for a in args],
                           env={"VELA_SERVER_DATA_DIR": str(tmp_path), "VELA_CONFIG": ""})
    assert r.exit_code == 130, r.output
    assert shown in r.stdout
    assert r.stderr.splitlines() == [
        "stopped following build 7, which carries on on the server: `vela build logs 7 "
        "--follow` picks it up again, `vela build cancel 7` stops it"]
    assert "Traceback" not in r.output


class _Stream:
    """An API whose build 9 logs a line in steps 1 and 2, then ends."""

    def stream(self, path, **params):
        yield {"event": "log", "id": 1, "step": 1, "text": "one\n"}
        yield {"event": "log", "id": 2, "step": 2, "text": "two\n"}
        yield {"event": "end", "status": "success", "reason": None}

    def get(self, path):
        return {"id": 9, "status": "success", "reason": None}


@pytest.mark.parametrize("live", [True, False])
def test_follow_with_a_step_prints_only_that_steps_log(monkeypatch, live):
    """`vela build logs ID --step 2 --follow` shows step 2's log, as without --follow."""
    said: list[str] = []
    monkeypatch.setattr(client_cmd, "_say", said.append)
    client_cmd._follow(_Stream(), {"id": 9}, quiet=False, live_logs=live, step=2)
    assert [line for line in said if line.startswith("[")] == ["[2] two"]
