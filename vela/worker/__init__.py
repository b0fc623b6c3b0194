"""The worker's core: takes sealed build packages, runs them, reports back.

Plain asyncio, no Ray; ``actors/worker.py`` is the Ray shell around it.
"""

from vela.worker.core import BuildRunner, Job, Receipt, ServerLink, WorkerCore

__all__ = ["BuildRunner", "Job", "Receipt", "ServerLink", "WorkerCore"]
