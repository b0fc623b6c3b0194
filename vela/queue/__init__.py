"""The build queue: routed, at-least-once, signed items; Redis or the database.

Back ends: :class:`vela.queue.redis_queue.RedisQueue` and
:class:`vela.queue.db_queue.DatabaseQueue`; :func:`open_queue` picks one.
"""

from vela.queue.base import DeadLetter, Queue, QueueError, Reservation, RouteDepth, Settlement
from vela.queue.factory import open_queue
from vela.queue.item import (
    InvalidReason,
    ItemSigner,
    ItemVerifier,
    QueueItem,
    QueueItemInvalid,
)
from vela.queue.listener import (
    Backoff,
    Capacity,
    Dispatcher,
    Listener,
    ListenerStats,
    Outcome,
    Rejected,
    Step,
    SubmitResult,
    is_transient,
)

__all__ = [
    "Backoff",
    "Capacity",
    "DeadLetter",
    "Dispatcher",
    "InvalidReason",
    "ItemSigner",
    "ItemVerifier",
    "Listener",
    "ListenerStats",
    "Outcome",
    "Queue",
    "QueueError",
    "QueueItem",
    "QueueItemInvalid",
    "Rejected",
    "Reservation",
    "RouteDepth",
    "Settlement",
    "Step",
    "SubmitResult",
    "is_transient",
    "open_queue",
]
