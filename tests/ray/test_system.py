"""The running system on a real Ray cluster: actors, workers, losses, restarts."""

from __future__ import annotations

import pytest

from tests.ray.conftest import add_worker, run_build, view, wait_terminal, wait_until
from tests.server.conftest import HELLO, pipeline

pytestmark = pytest.mark.ray

SECRET = "ray-s3cr3t-Value"


def test_builds_run_end_to_end_with_secrets_masked(settings, server):
    add_worker(settings, server, "w1")
    add_worker(settings, server, "w2")
    ids = [run_build(server, HELLO, secrets={"api_token": SECRET}) for _ in range(4)]
    for build_id in ids:
        v = wait_terminal(server, build_id)
        assert v["status"] == "success", v
        assert [s["status"] for s in v["steps"]] == ["success", "success"]
        text = "".join(c["text"] for c in v["logs"])
        assert "token is ***" in text and SECRET not in text
        assert v["dispatched_at"] and v["started_at"] and v["finished_at"]
    assert {view(server, b)["worker"] for b in ids} <= {"w1", "w2"}


def test_worker_actor_killed_mid_build_ends_worker_lost(settings, server):
    import ray

    doomed = add_worker(settings, server, "doomed")
    slow = run_build(server, pipeline("echo started", "sleep 60"))
    wait_until(lambda: view(server, slow)["started_at"], 60, "the build to start")
    ray.kill(doomed, no_restart=True)
    v = wait_terminal(server, slow, timeout_s=30)
    assert (v["status"], v["reason"]) == ("error", "worker_lost")
    add_worker(settings, server, "fresh")
    nxt = run_build(server, pipeline("true"))
    v = wait_terminal(server, nxt)
    assert v["status"] == "success" and v["worker"] == "fresh"


def test_scheduler_killed_mid_stream_every_build_ends_once(settings, server):
    import ray

    from actors._ray import SCHEDULER

    add_worker(settings, server, "w1", build_limit=2)
    ids = [run_build(server, pipeline("echo ran-once", "sleep 0.3")) for _ in range(8)]
    wait_until(lambda: any(view(server, b)["status"] == "running" for b in ids), 60)
    ray.kill(server[SCHEDULER], no_restart=False)  # Ray restarts it
    finals = [wait_terminal(server, b, timeout_s=120) for b in ids]
    assert [v["status"] for v in finals] == ["success"] * len(ids)
    # Exactly once: one run's output per build (a dispatch the restart voided
    # before the worker started may have been retried, never a started one).
    for v in finals:
        assert "".join(c["text"] for c in v["logs"]).count("ran-once") == 1, v


def test_node_removed_mid_build_ends_worker_lost(settings, server, cluster):
    node = cluster.add_node(num_cpus=1, resources={"vela_worker": 1})
    cluster.wait_for_nodes()
    node_id = node.node_id
    add_worker(settings, server, "remote", node_id=node_id)
    slow = run_build(server, pipeline("echo started", "sleep 60"))
    wait_until(lambda: view(server, slow)["started_at"], 60, "the build to start")
    assert view(server, slow)["worker"] == "remote"
    cluster.remove_node(node)
    v = wait_terminal(server, slow, timeout_s=60)
    assert (v["status"], v["reason"]) == ("error", "worker_lost")


def test_metrics_reach_the_dashboard_exporter(settings, server):
    import urllib.request

    import ray

    add_worker(settings, server, "m1")
    build_id = run_build(server, pipeline("true"))
    assert wait_terminal(server, build_id)["status"] == "success"

    names = ("vela_builds_finished_total", "vela_dispatch_latency_seconds",
             "vela_free_slots", "vela_workers", "vela_coalesced_requests_total")

    def exported() -> str:
        # Each process exports on its own period: wait until all have.
        text = ""
        for node in ray.nodes():
            if node["Alive"] and node.get("MetricsExportPort"):
                url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
                with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - local
                    text += r.read().decode()
        return text if all(name in text for name in names) else ""

    assert wait_until(exported, 60, f"{', '.join(names)} in the Prometheus export")


def test_a_registered_worker_process_loads_none_of_the_servers_libraries(settings, server):
    """Looking the Scheduler up by name ships its class to the worker's process; the
    server's libraries stay out of it (idle RSS, docs/performance.md)."""
    import ray

    def server_modules(_actor: object) -> list[str]:  # by value: runs in the worker
        import sys

        return sorted(m for m in ("sqlalchemy", "redis", "fastapi", "aiosqlite", "asyncpg")
                      if m in sys.modules)

    handle = add_worker(settings, server, "slim")
    build_id = run_build(server, pipeline("true"))
    assert wait_terminal(server, build_id)["status"] == "success"
    assert ray.get(handle.__ray_call__.remote(server_modules), timeout=60) == []
