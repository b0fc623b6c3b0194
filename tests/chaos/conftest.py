"""Chaos tests reuse the in-process server and the session Ray cluster."""

from tests.ray.conftest import server, settings  # noqa: F401
from tests.server.conftest import system  # noqa: F401
