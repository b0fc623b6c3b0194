"""The HTTP API (FastAPI; served by the API actor of ``actors/api.py``) and its client.

Names load on first use, so the CLI's client (``vela.api.client``) does not pay
for importing FastAPI.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "create_app": "vela.api.app",
    "OPS": "vela.api.backend", "Backend": "vela.api.backend",
    "RemoteBackend": "vela.api.backend", "ServerBackend": "vela.api.backend",
    "dispatch": "vela.api.backend",
    "ApiError": "vela.api.errors", "Code": "vela.api.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vela.api' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
