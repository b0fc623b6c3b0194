"""A step's output pipe has one owner, on uvloop too (Ray's loop in async actors)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from pathlib import Path

import uvloop

from vela.executor.runtime import _start

STEPS, ROUNDS = 8, 100


def _churn(stop: threading.Event, errors: list[str]) -> None:
    """Another thread of the worker opening and closing its own descriptors (as the
    workspace threads and Ray's own do), allocating enough to run the cyclic GC here."""
    while not stop.is_set():
        fd = os.open(os.devnull, os.O_RDONLY)
        junk: list[list[object]] = [[] for _ in range(50)]
        for item in junk:
            item.append(junk)
        try:
            os.fstat(fd)
            os.close(fd)
        except OSError as e:
            errors.append(f"{e.errno}")


async def _step(tmp: Path) -> bytes:
    proc = await _start(["/bin/sh", "-c", "echo hi"], env={"PATH": "/usr/bin:/bin"}, cwd=tmp)
    out = await proc.stdout.read()
    await proc.wait()
    cycle: list[object] = [proc]
    cycle.append(cycle)  # freed by the cyclic GC, in whichever thread runs it
    return out


def test_steps_never_close_a_descriptor_they_do_not_own(tmp_path):
    """Many steps at once on uvloop, their process objects freed by the cyclic GC in
    another thread: every step starts and reads its output to the end, and the other
    thread's descriptors are never closed under it. (With a ``connect_read_pipe``
    transport, libuv and the pipe's file object both closed the descriptor: steps
    failed to start with EBADF or hung.)"""
    stop, errors = threading.Event(), []
    churn = threading.Thread(target=_churn, args=(stop, errors))

    async def run() -> list[bytes | BaseException]:
        outs: list[bytes | BaseException] = []
        for _ in range(ROUNDS):
            outs += await asyncio.wait_for(asyncio.gather(
                *(_step(tmp_path) for _ in range(STEPS)), return_exceptions=True), 30)
        return outs

    churn.start()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            outs = runner.run(run())
    finally:
        stop.set()
        churn.join()
    gc.collect()
    assert outs == [b"hi\n"] * (STEPS * ROUNDS)
    assert errors == []
