"""Exception families. Each carries a message a user can act on."""

from __future__ import annotations


class VelaError(Exception):
    """Base of every error Vela raises on purpose."""


class ConfigError(VelaError):
    """The configuration is invalid; the message names the key and its source."""


class NotFound(VelaError):
    """A referenced object (build, repo, worker, secret...) does not exist."""


class Conflict(VelaError):
    """A compare-and-set lost: the object was not in the expected state."""


class InvalidTransition(VelaError):
    """A state change the state machine does not allow."""


class WorkerGone(Exception):
    """The worker's actor (or its node) is dead: no point in retrying it."""


class Unavailable(VelaError):
    """Transient trouble on the answering side (its database, say): retry later."""
