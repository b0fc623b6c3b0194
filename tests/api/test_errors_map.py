"""What the API answers for each family of error: the status, the code, and a message
that says what to do (and never the exception's own text for unexpected errors)."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from vela.api.errors import to_api_error
from vela.errors import Conflict, NotFound


def test_backend_outages_are_503_retry_and_hide_their_details():
    db = OperationalError("INSERT ...", {"password": "hunter2"}, Exception("conn refused"))
    for exc in (db, RedisConnectionError("redis://:hunter2@host down"), TimeoutError()):
        err = to_api_error(exc)
        assert err.status == 503 and "retry" in err.message
        assert "hunter2" not in err.message


def test_domain_errors_keep_their_status_and_unknown_ones_are_500():
    assert to_api_error(NotFound("build 9")).status == 404
    assert to_api_error(Conflict("lost")).status == 409
    err = to_api_error(RuntimeError("secret internals"))
    assert err.status == 500 and "secret" not in err.message
