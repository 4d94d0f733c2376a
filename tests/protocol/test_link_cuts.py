"""A device and a hub over a lossy link that is cut, and whose ends restart, at random points.

Whatever happens, nothing the device produced is lost, nothing is stored twice, and no command
runs twice (protocol.md §1: reliable messages, cumulative acks, at-most-once ids).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.helpers import SessionPair


class LinkCuts(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = SessionPair()

    @initialize()
    def start_connected(self) -> None:
        self.pair.connect()

    @rule(messages=st.integers(1, 3), readings=st.integers(1, 5))
    def produce(self, messages: int, readings: int) -> None:
        for _ in range(messages):
            self.pair.produce(readings)

    @rule()
    def post_command(self) -> None:
        self.pair.post_command()

    @rule()
    def connect(self) -> None:
        self.pair.connect()

    @precondition(lambda self: self.pair.connected)
    @rule(n=st.integers(1, 8))
    def deliver_up(self, n: int) -> None:
        self.pair.deliver_up(n)

    @precondition(lambda self: self.pair.connected)
    @rule(n=st.integers(1, 8))
    def deliver_down(self, n: int) -> None:
        self.pair.deliver_down(n)

    @precondition(lambda self: self.pair.connected)
    @rule(n=st.integers(1, 4))
    def replay_sent(self, n: int) -> None:
        self.pair.replay_sent(n)

    @rule(limit=st.sampled_from([1, 2]))
    def store_commits(self, limit: int) -> None:
        self.pair.store_commits(limit)

    @rule(kind=st.sampled_from(["cut", "restart_device", "restart_hub"]))
    def disrupt(self, kind: str) -> None:
        """One rule for all three, so disruptions stay rarer than traffic."""
        getattr(self.pair, kind)()

    @rule(dt=st.sampled_from([0.5, 4.0, 6.0, 16.0]))
    def advance(self, dt: float) -> None:
        self.pair.advance(dt)

    @invariant()
    def nothing_committed_twice(self) -> None:
        assert self.pair.store.no_duplicate_seqs()

    @invariant()
    def dropped_from_outbox_means_stored(self) -> None:
        pair = self.pair
        for ts, seq in pair.produced.items():
            if seq not in pair.outbox and seq <= pair.seqs.last:
                assert ts in pair.store.samples, f"sample {ts} (seq {seq}) left the outbox unstored"

    @invariant()
    def commands_run_at_most_once(self) -> None:
        assert all(n <= 1 for n in self.pair.executions.values()), self.pair.executions

    def teardown(self) -> None:
        pair = self.pair
        pair.drain()
        assert not pair.outbox
        assert set(pair.store.samples) == set(pair.produced)
        assert pair.store.samples == pair.produced  # each stored with the seq that carried it
        assert pair.store.no_duplicate_seqs()
        assert pair.executions == {cid: 1 for cid in pair.commands}
        assert all(c.status == "succeeded" for c in pair.commands.values())


LinkCuts.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLinkCuts = LinkCuts.TestCase
