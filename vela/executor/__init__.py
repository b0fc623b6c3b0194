"""Runs a build's steps: plain asyncio, no Ray.

The WorkerActor calls :func:`run_build` with a :class:`Runtime` from
:func:`choose_runtime` and its own :class:`Reporter`.
"""

from vela.executor.build import BuildResult, Reason, Reporter, StepResult, run_build
from vela.executor.masking import MASK, Masker
from vela.executor.runtime import (
    DEFAULT_HIDDEN_PATHS,
    BwrapRuntime,
    LocalRuntime,
    Runtime,
    SandboxUnavailable,
    choose_runtime,
)

__all__ = [
    "DEFAULT_HIDDEN_PATHS",
    "MASK",
    "BuildResult",
    "BwrapRuntime",
    "LocalRuntime",
    "Masker",
    "Reason",
    "Reporter",
    "Runtime",
    "SandboxUnavailable",
    "StepResult",
    "choose_runtime",
    "run_build",
]
