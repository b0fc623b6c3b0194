"""Placement: route, active, healthy, free slot; least loaded, then least recently used."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vela.scheduling import WorkerRegistry


def reg(*specs):
    r = WorkerRegistry()
    for host, routes, limit in specs:
        r.upsert(host, routes=routes, build_limit=limit)
    return r


def test_only_workers_serving_the_route():
    r = reg(("a", ["vela"], 1), ("g", ["gpu"], 1))
    assert r.choose("gpu").hostname == "g"
    assert r.choose("vela").hostname == "a"
    assert r.choose("other") is None
    assert r.free_slots() == {"vela": 1, "gpu": 1}


def test_least_loaded_then_least_recent():
    r = reg(("a", ["vela"], 3), ("b", ["vela"], 3))
    first = r.choose("vela").hostname
    r.assign(first, 1)
    second = r.choose("vela").hostname
    assert second != first
    r.assign(second, 2)
    # Both at load 1: the one loaded first is the least recently used.
    assert r.choose("vela").hostname == first
    r.release(first, 1)
    assert r.choose("vela").hostname == first  # least loaded wins


def test_full_unhealthy_inactive_are_never_chosen():
    r = reg(("a", ["vela"], 1), ("b", ["vela"], 1), ("c", ["vela"], 1))
    r.assign("a", 1)
    r.set_health("b", False)
    r.set_active("c", False)
    assert r.choose("vela") is None and r.free_slots() == {}
    r.set_health("b", True)
    assert r.choose("vela").hostname == "b" and r.free_slots() == {"vela": 1}
    assert r.choose("vela", exclude=["b"]) is None


def test_worker_of_follows_assign_release_and_remove():
    r = reg(("a", ["vela"], 2), ("b", ["vela"], 1))
    r.assign("a", 1)
    r.assign("b", 2)
    assert (r.worker_of(1), r.worker_of(2), r.worker_of(3)) == ("a", "b", None)
    r.upsert("a", routes=["vela"], build_limit=2)  # re-registration keeps it
    assert r.worker_of(1) == "a"
    assert r.release("a", 1) and r.worker_of(1) is None
    assert not r.release("a", 2) and r.worker_of(2) == "b"  # not a's to release
    r.remove("b")
    assert r.worker_of(2) is None


def test_reregistration_keeps_running_builds():
    r = reg(("a", ["vela"], 2))
    r.assign("a", 7)
    r.upsert("a", routes=["vela", "x"], build_limit=4)
    assert r.get("a").running == {7}
    assert r.free_slots() == {"vela": 3, "x": 3}
    r.remove("a")
    assert r.free_slots() == {} and r.choose("vela") is None


@given(st.lists(st.tuples(st.sampled_from(["assign", "release", "sick", "well", "off", "on"]),
                          st.integers(0, 4), st.integers(0, 20)), max_size=80))
def test_index_matches_a_full_scan(ops):
    r = WorkerRegistry()
    for i in range(5):
        r.upsert(f"w{i}", routes=["vela"] if i % 2 else ["vela", "b"], build_limit=1 + i % 3,
                 backlog=i % 2)
    for op, w, b in ops:
        host = f"w{w}"
        if op == "assign" and r.get(host).eligible:
            r.assign(host, b)
        elif op == "release":
            r.release(host, b)
        elif op in ("sick", "well"):
            r.set_health(host, op == "well")
        elif op in ("off", "on"):
            r.set_active(host, op == "on")
        assert r.free_total == sum(e.free for e in r.workers() if e.eligible)
        for route in ("vela", "b"):
            eligible = [e for e in r.workers() if route in e.routes and e.eligible]
            assert r.free_slots().get(route, 0) == sum(e.free for e in eligible)
            chosen = r.choose(route)
            if not eligible:
                assert chosen is None
            else:
                # Least loaded among those with a slot free; a backlog only after them.
                assert chosen.rank == min(e.rank for e in eligible)
                with_slot = [e for e in eligible if e.load < e.build_limit]
                if with_slot:
                    assert chosen.load == min(e.load for e in with_slot)


def test_a_backlog_is_taken_only_when_no_worker_has_a_slot_free():
    r = WorkerRegistry()
    r.upsert("small", routes=["vela"], build_limit=1, backlog=2)
    r.upsert("big", routes=["vela"], build_limit=4)
    r.assign("small", 1)
    assert r.free_slots() == {"vela": 6}
    for b in (2, 3, 4, 5):  # big's slots, although small has the lower load
        assert r.choose("vela").hostname == "big"
        r.assign("big", b)
    for b in (6, 7):
        assert r.choose("vela").hostname == "small"
        r.assign("small", b)
    assert r.choose("vela") is None and r.get("small").free == 0
    r.release("big", 2)
    assert r.choose("vela").hostname == "big"


def test_changes_that_may_free_a_slot_are_announced():
    calls = []
    r = WorkerRegistry(on_change=lambda: calls.append(1))
    r.upsert("a", routes=["vela", "gpu"], build_limit=2)
    r.assign("a", 1)
    r.release("a", 1)
    r.set_health("a", False)
    assert len(calls) == 4
    r.release("a", 99)  # nothing held: nothing changed
    assert len(calls) == 4
    r.set_health("a", True)
    assert r.free_total == 2 and r.free_slots() == {"vela": 2, "gpu": 2}


def test_a_backlog_read_from_a_worker_status_is_bounded():
    """A recovering Scheduler takes a worker's backlog from its status: anything but a
    count within MAX_BACKLOG counts as none."""
    from vela.domain import MAX_BACKLOG
    from vela.server.scheduler import _backlog

    assert _backlog({"backlog": 3}) == 3 and _backlog({}) == 0
    for bad in (-1, MAX_BACKLOG + 1, "3", None, 2.5):
        assert _backlog({"backlog": bad}) == 0
