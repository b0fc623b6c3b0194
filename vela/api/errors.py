"""The API's one error shape, ``{"code", "message"}`` (plus ``field``/``details`` when a
request was invalid), and the single mapping from Vela's exceptions to it.

Codes are stable: clients, tests and logs match on them, never on messages.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from vela.errors import Conflict, InvalidTransition, NotFound, VelaError


class Code(StrEnum):
    UNAUTHENTICATED = "unauthenticated"    # 401: no token, or one that does not verify
    BAD_CREDENTIAL = "bad_credential"      # 401: `POST /api/v1/login` with a wrong credential
    FORBIDDEN = "forbidden"                # 403: a valid token without the needed scope
    NOT_FOUND = "not_found"                # 404
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    CONFLICT = "conflict"                  # 409: exists already, or not in the needed state
    VALIDATION_FAILED = "validation_failed"    # 422: ``field`` names the first bad field
    INVALID_PIPELINE = "invalid_pipeline"  # 422: the pipeline YAML does not compile
    BAD_REQUEST = "bad_request"            # 400: e.g. an unknown route
    UNAVAILABLE = "unavailable"            # 503: the server's actors are not reachable
    INTERNAL = "internal"                  # 500: a bug; details only in the server's logs


class ApiError(VelaError):
    """An error the API answers as is."""

    def __init__(self, status: int, code: Code | str, message: str, *,
                 field: str | None = None, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = Code(code)
        self.message = message
        self.field = field
        self.details = details
        self.headers = headers
        # For 401s: the token check's stable reason code (expired, wrong_type...).
        self.reason = reason

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Crosses the Scheduler actor's boundary intact (Ray pickles it).
        return (_rebuild, (self.status, self.code.value, self.message, self.field,
                           self.details, self.headers, self.reason))

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.field is not None:
            out["field"] = self.field
        if self.details:
            out["details"] = self.details
        return out

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code.value!r})"


def _rebuild(status: int, code: str, message: str, field: str | None,
             details: list[dict[str, Any]] | None,
             headers: dict[str, str] | None, reason: str | None) -> ApiError:
    return ApiError(status, code, message, field=field, details=details, headers=headers,
                    reason=reason)


def unauthenticated(message: str, reason: str = "missing") -> ApiError:
    return ApiError(401, Code.UNAUTHENTICATED, message, reason=reason,
                    headers={"WWW-Authenticate": 'Bearer realm="vela"'})


def to_api_error(exc: BaseException) -> ApiError:
    """What the API answers for ``exc``: the one place domain errors get a status."""
    from vela.pipeline import PipelineError
    from vela.queue.listener import is_transient
    from vela.security import Rejected

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Rejected):
        return unauthenticated(str(exc), exc.reason.value)
    if isinstance(exc, NotFound):
        return ApiError(404, Code.NOT_FOUND, str(exc))
    if isinstance(exc, Conflict | InvalidTransition):
        return ApiError(409, Code.CONFLICT, str(exc))
    if isinstance(exc, PipelineError):
        details = [{"line": line, "field": path, "message": msg}
                   for line, path, msg in exc.problems]
        return ApiError(422, Code.INVALID_PIPELINE, f"the pipeline is invalid:\n{exc}",
                        field="pipeline", details=details)
    if isinstance(exc, VelaError):
        return ApiError(400, Code.BAD_REQUEST, str(exc))
    if isinstance(exc, TimeoutError):
        return ApiError(503, Code.UNAVAILABLE, "the server did not answer in time; retry")
    if is_transient(exc):
        return ApiError(503, Code.UNAVAILABLE,
                        "the database or queue is unreachable right now; retry shortly")
    return ApiError(500, Code.INTERNAL, "internal error; the server's log has the details")
