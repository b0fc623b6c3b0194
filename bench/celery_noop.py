"""The Celery side of ``bench/dispatch.py``: one task that runs ``true`` in a subprocess.

``bench/dispatch.py`` starts the worker itself (``celery -A bench.celery_noop worker``);
the broker and the queue name come from the environment it sets:

    VELA_BENCH_CELERY_BROKER   default redis://127.0.0.1:6379/12 (also the result backend)
    VELA_BENCH_CELERY_QUEUE    default vela-bench

Needs the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import os
import subprocess
import time

from celery import Celery

BROKER = os.environ.get("VELA_BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/12")
QUEUE = os.environ.get("VELA_BENCH_CELERY_QUEUE", "vela-bench")

app = Celery("vela_bench", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="vela_bench.noop")
def noop() -> list[float]:
    """Run ``true``; return (started, finished) as epoch seconds."""
    started = time.time()
    subprocess.run(["true"], check=True)
    return [started, time.time()]
