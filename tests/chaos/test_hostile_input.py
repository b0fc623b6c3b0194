"""Hostile input: the queue item decoder only raises its documented error, and a
flood of malformed items does not stop good builds from flowing."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import pipeline
from vela.queue.item import ItemSigner, ItemVerifier, QueueItem, QueueItemInvalid

KEY = Ed25519PrivateKey.generate()
VERIFIER = ItemVerifier({"k": KEY.public_key()}, ["vela"], max_bytes=4096)
GOOD = ItemSigner(KEY, "k").sign(QueueItem.new(7, "vela", now=1.0))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def _only_documented(raw: bytes) -> None:
    try:
        VERIFIER.verify(raw, route="vela")
    except QueueItemInvalid:
        pass


@given(st.binary(max_size=600))
def test_decoder_on_random_bytes(raw):
    _only_documented(raw)


@given(json_values)
def test_decoder_on_random_json(value):
    _only_documented(json.dumps(value).encode())


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_decoder_on_mutated_good_items(data):
    envelope = json.loads(GOOD)
    path = data.draw(st.sampled_from(["kid", "sig", "item.build_id", "item.route",
                                      "item.attempt", "item.enqueued_at", "item.v", "extra"]))
    value = data.draw(json_values)
    target = envelope
    *parents, leaf = path.split(".")
    for p in parents:
        target = target[p]
    target[leaf] = value
    raw = json.dumps(envelope).encode()
    try:
        item = VERIFIER.verify(raw, route="vela")
    except QueueItemInvalid:
        return
    # Anything accepted must be exactly what was signed.
    assert item == QueueItem.model_validate(json.loads(GOOD)["item"])


async def test_flood_of_malformed_items_does_not_stop_good_builds(system):
    await system.add_worker("w1")
    garbage = [b"", b"{", b"null", b"x" * 5000, json.dumps({"item": {}}).encode(),
               ItemSigner(Ed25519PrivateKey.generate(), "k").sign(QueueItem.new(1, "vela"))]
    for i in range(100):
        await system.queue.push("vela", garbage[i % len(garbage)])
    good = await system.submit(pipeline("echo fine"))
    build = (await system.pump([good], timeout_s=120))[good]
    assert build.status == "success"
    await system.listener.run_until_idle()
    depth = (await system.queue.depth())["vela"]
    assert depth.dead == 100 and depth.ready == 0 and depth.in_flight == 0
    assert system.listener.healthy
