"""Random interleavings of push, reserve, ack, release, dead-letter, consumer crash
and lease expiry, checked against a model on every back end.

Every pushed item ends acked or dead-lettered, none is lost, none is acked
twice, and a settlement with a lapsed lease never takes effect.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.queue.conftest import FakeClock, on_all_backends
from vela.queue import Queue, Reservation, RouteDepth

LEASE = 10.0
ROUTES = ["vela", "gpu"]

TICKS = [0.5, 1.0, LEASE - 1, LEASE, LEASE + 1]
# Weighted towards the sequences that matter: crash, expire, redeliver, late settle.
OPS = st.one_of(
    st.tuples(st.just("push"), st.sampled_from(ROUTES)),
    st.tuples(st.just("push"), st.sampled_from(ROUTES)),
    st.tuples(st.just("reserve"), st.permutations(ROUTES)),
    st.tuples(st.just("reserve"), st.lists(st.sampled_from(ROUTES), min_size=1, unique=True)),
    st.tuples(st.sampled_from(["ack", "ack", "release", "dead", "crash", "crash"]),
              st.integers(0, 7)),
    st.tuples(st.sampled_from(["zombie_ack", "zombie_ack", "zombie_release", "zombie_dead"]),
              st.integers(0, 7)),
    # "tick" only moves the clock; "expire" moves it and reclaims, as a listener would.
    st.tuples(st.sampled_from(["tick", "expire", "expire"]), st.sampled_from(TICKS)),
)


@dataclass
class Model:
    route: str
    payload: bytes
    state: str = "ready"  # ready | leased | acked | dead
    lease_id: str | None = None
    deadline: float = 0.0
    deliveries: int = 0


class Run:
    def __init__(self, queue: Queue, clock: FakeClock) -> None:
        self.q, self.clock = queue, clock
        self.items: dict[str, Model] = {}
        self.held: list[Reservation] = []
        self.zombies: list[Reservation] = []
        self.pushed = 0

    def current(self, res: Reservation) -> bool:
        m = self.items[res.id]
        return m.state == "leased" and m.lease_id == res.lease_id

    async def push(self, route: str) -> None:
        self.pushed += 1
        payload = f"item-{self.pushed}".encode()
        item_id = await self.q.push(route, payload)
        assert item_id not in self.items or self.items[item_id].state in ("acked",), item_id
        self.items[item_id] = Model(route, payload)

    async def reserve(self, routes: list[str]) -> Reservation | None:
        res = await self.q.reserve(routes, lease_s=LEASE)
        ready_routes = [r for r in routes
                        if any(m.state == "ready" and m.route == r for m in self.items.values())]
        if res is None:
            assert not ready_routes, f"an item is ready on {ready_routes} but none was handed out"
            return None
        assert ready_routes and res.route == ready_routes[0], "routes are tried in order"
        m = self.items[res.id]
        assert m.state == "ready", f"handed out an item that is {m.state}"
        assert (res.route, res.payload) == (m.route, m.payload)
        m.state, m.lease_id, m.deadline = "leased", res.lease_id, res.deadline
        m.deliveries += 1
        assert res.deliveries == m.deliveries
        return res

    async def settle(self, action: str, res: Reservation) -> None:
        expected = self.current(res)
        m = self.items[res.id]
        if action == "ack":
            done = await self.q.ack(res)
            new_state = "acked"
        elif action == "release":
            done = await self.q.release(res)
            new_state = "ready"
        else:
            done = await self.q.dead_letter(res, "bad_signature", "test")
            new_state = "dead"
        assert done is expected, f"{action} with {'current' if expected else 'stale'} lease"
        if done:
            if action == "release":
                m.deliveries -= 1
            m.state, m.lease_id = new_state, None

    async def reclaim(self) -> None:
        now = self.clock()
        expired = [m for m in self.items.values() if m.state == "leased" and m.deadline <= now]
        assert await self.q.reclaim_expired() == len(expired)
        for m in expired:
            m.state, m.lease_id = "ready", None

    async def check_depth(self) -> None:
        want: dict[str, dict[str, int]] = {}
        names = {"ready": "ready", "leased": "in_flight", "dead": "dead"}
        for m in self.items.values():
            if m.state in names:
                d = want.setdefault(m.route, {"ready": 0, "in_flight": 0, "dead": 0})
                d[names[m.state]] += 1
        assert await self.q.depth() == {r: RouteDepth(**d) for r, d in want.items()}

    async def step(self, op: str, arg) -> None:
        if op == "push":
            await self.push(arg)
        elif op == "reserve":
            res = await self.reserve(arg)
            if res is not None:
                self.held.append(res)
        elif op in ("ack", "release", "dead", "crash") and self.held:
            res = self.held.pop(arg % len(self.held))
            if op == "crash":
                self.zombies.append(res)  # the consumer died holding it
            else:
                await self.settle(op, res)
        elif op.startswith("zombie_") and self.zombies:
            # A consumer thought dead comes back and settles late.
            await self.settle(op.removeprefix("zombie_"), self.zombies.pop(arg % len(self.zombies)))
        elif op == "tick":
            self.clock.advance(arg)
        elif op == "expire":
            self.clock.advance(arg)
            await self.reclaim()

    async def drain(self) -> None:
        self.clock.advance(10 * LEASE)
        await self.reclaim()
        for res in self.held + self.zombies:
            assert await self.q.ack(res) is False, "every old lease has lapsed"
        while (res := await self.reserve(ROUTES)) is not None:
            await self.settle("ack", res)

        states = {m.state for m in self.items.values()}
        assert states <= {"acked", "dead"}, f"items left behind: {states}"
        dead = {i for i, m in self.items.items() if m.state == "dead"}
        assert {d.id for d in await self.q.dead_letters(limit=1000)} == dead
        await self.check_depth()


@on_all_backends
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(program=st.lists(OPS, max_size=40))
# The interleavings that matter most always run, whatever the random draw.
@example(program=[  # crash, redelivery, then the crashed consumer acks late
    ("push", "vela"), ("reserve", ["vela"]), ("crash", 0), ("expire", LEASE),
    ("reserve", ["vela"]), ("zombie_ack", 0), ("ack", 0)])
@example(program=[  # a lease is not reclaimed a moment early
    ("push", "vela"), ("reserve", ["vela"]), ("expire", LEASE - 1), ("expire", 0.5),
    ("expire", 0.5), ("ack", 0)])
@example(program=[  # late release and dead-letter after redelivery change nothing
    ("push", "gpu"), ("push", "gpu"), ("reserve", ["gpu"]), ("crash", 0),
    ("expire", LEASE + 1), ("zombie_release", 0), ("reserve", ["vela", "gpu"]),
    ("crash", 0), ("expire", LEASE), ("reserve", ["gpu"]), ("zombie_dead", 0),
    ("release", 0), ("reserve", ["gpu"]), ("dead", 0)])
async def test_random_interleavings_lose_nothing_and_ack_once(backend, program):
    clock = FakeClock()
    run = Run(await backend.new(clock), clock)
    for op, arg in program:
        await run.step(op, arg)
        await run.check_depth()
    await run.drain()
