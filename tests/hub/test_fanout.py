"""Dashboard frames within a byte budget, and a deleted device leaving the fan-out index
(the queue's drop policy is covered in test_units)."""

from __future__ import annotations

import orjson

from ems.hub.fanout import TELEMETRY, DashboardQueue, FanOut, Subscriber


def update(n: int, size: int = 0) -> bytes:
    return orjson.dumps({"type": "telemetry_update", "n": n, "pad": "x" * size})


def frames(queue: DashboardQueue, **kwargs: int) -> list[dict]:
    out = []
    while (frame := queue.take_frame(**kwargs)) is not None:
        out.append(orjson.loads(frame))
    return out


def unpack(frame: dict) -> list[dict]:
    return frame["messages"] if frame["type"] == "batch" else [frame]


def test_frames_stay_within_the_byte_budget_and_keep_the_order() -> None:
    queue = DashboardQueue(1000)
    for n in range(100):
        queue.put(TELEMETRY, update(n, size=1000))
    sent = frames(queue, max_bytes=10_000)
    assert len(sent) > 1
    for frame in sent:
        assert len(orjson.dumps(frame)) <= 10_000
    assert [m["n"] for f in sent for m in unpack(f)] == list(range(100))


def test_an_update_larger_than_the_budget_still_goes_alone() -> None:
    queue = DashboardQueue(10)
    queue.put(TELEMETRY, update(1, size=50))
    queue.put(TELEMETRY, update(2, size=5000))
    queue.put(TELEMETRY, update(3, size=50))
    sent = frames(queue, max_bytes=1000)
    assert [[m["n"] for m in unpack(f)] for f in sent] == [[1], [2], [3]]


def test_forgetting_a_deleted_device_ends_its_explicit_subscriptions() -> None:
    fanout = FanOut()
    alice = Subscriber(username="alice", is_admin=False, queue=DashboardQueue(10))
    fanout.add(alice)
    fanout.subscribe(alice, ["dev-1", "dev-2"])
    fanout.forget_device("dev-1")
    assert fanout.publish("dev-1", "bob", TELEMETRY, update(1)) == 0
    assert fanout.publish("dev-2", "alice", TELEMETRY, update(2)) == 1
    assert alice.devices == {"dev-2"}
    fanout.forget_device("never-subscribed")
