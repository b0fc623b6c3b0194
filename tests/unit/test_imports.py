"""What each kind of process loads."""

from __future__ import annotations

import subprocess
import sys


def test_a_worker_process_does_not_load_the_servers_storage_or_queue():
    """A WorkerActor's process stays small (docs/performance.md, footprint): no
    SQLAlchemy, no redis, no web framework."""
    probe = ("import sys, actors.worker; "
             "print(sorted(m for m in ('sqlalchemy', 'redis', 'fastapi', 'aiosqlite') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
