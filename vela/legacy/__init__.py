"""Legacy queue mode (classic Vela's worker pull), kept beside server mode for migration.

Routes are split between the modes by ``queue.mode`` / ``queue.legacy_routes``
(:mod:`vela.legacy.modes`). On a legacy route a :class:`LegacyWorker` pops the
queue itself and talks to the server's :class:`LegacyGateway` with the shared
WORKER_SECRET. ``docs/migration.md`` says how to leave it.
"""

from vela.legacy.gateway import LegacyGateway, authorize_legacy_report, check_worker_secret
from vela.legacy.modes import (
    check_legacy_routes,
    check_queueless_routes,
    check_server_modes,
    check_worker_modes,
)
from vela.legacy.worker import LegacyServer, LegacyWorker, Poll

__all__ = [
    "LegacyGateway", "LegacyServer", "LegacyWorker", "Poll", "authorize_legacy_report",
    "check_legacy_routes", "check_queueless_routes", "check_server_modes",
    "check_worker_modes", "check_worker_secret",
]
