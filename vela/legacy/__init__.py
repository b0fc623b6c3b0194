"""Legacy queue mode (classic Vela's worker pull), kept beside server mode for migration.

Routes are split between the modes by ``queue.mode`` / ``queue.legacy_routes``
(:mod:`vela.legacy.modes`). On a legacy route a :class:`LegacyWorker` pops the
queue itself and talks to the server's :class:`LegacyGateway` with the shared
WORKER_SECRET (:mod:`vela.legacy.gateway`, :mod:`vela.legacy.worker`).
``docs/migration.md`` says how to leave it.

Nothing is imported here: `vela serve` checks the modes before Ray's head starts, and
that check must not load the gateway's database libraries.
"""
