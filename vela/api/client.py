"""The CLI's side of the API: an HTTP client and the credentials file.

The credentials file (``api.credentials_file``, default
``<data_dir>/credentials.json``) holds the API URL and one API token; it is
written with mode 0600 and refused if anyone else may read it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vela.errors import VelaError


class ClientError(VelaError):
    """The API refused a request (``status``, ``code``) or could not be reached (0)."""

    def __init__(self, status: int, code: str, message: str,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body or {}


@dataclass(frozen=True)
class Credentials:
    url: str
    token: str = field(repr=False)
    subject: str = ""
    scopes: tuple[str, ...] = ()
    expires_at: int = 0


def save_credentials(path: Path, creds: Credentials) -> None:
    """Write ``creds`` readable by this user only (the file is replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**asdict(creds), "scopes": list(creds.scopes)}, f, indent=2)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_credentials(path: Path) -> Credentials | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise VelaError(f"{path} is readable by others; `chmod 600 {path}` or log in again")
    try:
        data = json.loads(path.read_text())
        return Credentials(url=str(data["url"]), token=str(data["token"]),
                           subject=str(data.get("subject", "")),
                           scopes=tuple(data.get("scopes", ())),
                           expires_at=int(data.get("expires_at", 0)))
    except (ValueError, KeyError, TypeError):
        raise VelaError(f"{path} is not a credentials file; run `vela login`") from None


class ApiClient:
    """Calls on the API; every refusal is a :class:`ClientError` with the API's code."""

    def __init__(self, base_url: str, token: str | None = None, *,
                 http: httpx.Client | None = None, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._headers = headers

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, json_body: Any = None,
                params: Any = None) -> Any:
        try:
            r = self._http.request(method, path, json=json_body, params=params,
                                   headers=self._headers)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        if r.status_code >= 400:
            raise self._error(r.status_code, r.content)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json_body=body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json_body=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def stream(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """NDJSON events of a streaming endpoint (``logs?follow=true``)."""
        try:
            with self._http.stream("GET", path, params=params, headers=self._headers,
                                   timeout=httpx.Timeout(30.0, read=None)) as r:
                if r.status_code >= 400:
                    raise self._error(r.status_code, r.read())
                for line in r.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None

    def _unreachable(self, e: Exception) -> ClientError:
        return ClientError(0, "unreachable", f"cannot reach the API at {self.base_url} "
                           f"({type(e).__name__}); is `vela serve` running? "
                           "(api.url / VELA_API_URL, or `vela login --url`)")

    @staticmethod
    def _error(status: int, content: bytes) -> ClientError:
        try:
            body = json.loads(content)
            code, message = str(body["code"]), str(body["message"])
        except (ValueError, KeyError, TypeError):
            body, code, message = {}, "http_error", f"HTTP {status}"
        if status == 401 and code == "unauthenticated":
            message += " — log in with `vela login`"
        return ClientError(status, code, message, body)
