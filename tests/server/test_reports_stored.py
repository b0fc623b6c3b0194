"""What a step prints and why a build ended are stored as the database can hold them,
never refused: a refused report loses the build's end (it would end worker_lost, after
the worker retried a write that can never succeed)."""

from __future__ import annotations

from tests.server.conftest import pipeline
from tests.server.test_server import logs_of
from vela.server.reports import MAX_MESSAGE_CHARS


async def test_a_step_printing_a_nul_byte_still_succeeds(system):
    """Binary output holds NUL, which PostgreSQL's text refuses: it is stored as U+FFFD."""
    await system.add_worker("w1")
    build_id = await system.submit(pipeline("printf 'a\\000b\\n'", "echo after"))
    build = (await system.pump([build_id], timeout_s=30))[build_id]
    assert (build.status, build.reason) == ("success", None), (build.reason, build.message)
    logs = await logs_of(system, build_id)
    assert "a\ufffdb" in logs and "after" in logs


async def test_a_long_end_message_is_cut_not_refused(system):
    """The executor's message names every missing secret; twenty long names made it
    longer than the server took, and the build ended worker_lost instead."""
    await system.add_worker("w1")
    names = tuple(f"s{i:02d}_" + "x" * 100 for i in range(20))
    build_id = await system.submit(pipeline("echo hi", secrets=names))
    build = (await system.pump([build_id], timeout_s=30))[build_id]
    assert (build.status, build.reason) == ("error", "missing_secret")
    assert build.message.startswith("secrets not provided: s00_")
    assert len(build.message) == MAX_MESSAGE_CHARS
