"""SessionPair: a DeviceSession and a HubSession joined by a lossy model wire (as h11's
ConnectionPair), with a model outbox on the device side and a model store on the hub side.

Everything is synchronous and driven by explicit calls; `now` is a plain float. The pair plays
the part of both drivers: it persists what a driver persists (outbox, seq counter, command
record) and loses what a crash loses (frames in flight, the hub's uncommitted ingest buffer).
"""

from __future__ import annotations

import copy
from collections import deque
from itertools import count

import attrs

from ems.protocol import messages as m
from ems.protocol._window import CommandRecord, SeqAllocator
from ems.protocol.codec import Codec
from ems.protocol.device_session import (
    Acked,
    DeviceSession,
    Dispatch,
    LinkDead,
    Redelivered,
)
from ems.protocol.hub_session import (
    CloseConnection,
    HelloReceived,
    HubSession,
    MessageReceived,
)

CODEC = Codec()
HEARTBEAT_S = 5.0


@attrs.define
class ModelStore:
    """What the hub has made durable."""

    samples: dict[float, int] = attrs.field(factory=dict)  # ts -> seq that stored it
    committed_seqs: list[int] = attrs.field(factory=list)
    acked: dict[str, int] = attrs.field(factory=dict)  # stream -> highest seq marked
    command_status: dict[str, str] = attrs.field(factory=dict)

    def no_duplicate_seqs(self) -> bool:
        return len(self.committed_seqs) == len(set(self.committed_seqs))


@attrs.define
class HubCommand:
    id: str
    name: str
    status: str = "pending"


@attrs.define
class SessionPair:
    """Device + hub over a wire that can be cut; both sides can be restarted."""

    now: float = 0.0
    store: ModelStore = attrs.field(factory=ModelStore)
    # device side, persistent (the agent's disk)
    stream: str = "s1"
    outbox: dict[int, str] = attrs.field(factory=dict)
    seqs: SeqAllocator = attrs.field(factory=SeqAllocator)
    persisted_record: CommandRecord = attrs.field(factory=CommandRecord)
    produced: dict[float, int] = attrs.field(factory=dict)  # ts -> seq
    executions: dict[str, int] = attrs.field(factory=dict)
    # hub side, persistent
    commands: dict[str, HubCommand] = attrs.field(factory=dict)
    # volatile
    device: DeviceSession | None = None
    hub: HubSession | None = None
    record: CommandRecord = attrs.field(factory=CommandRecord)
    up: deque[str] = attrs.field(factory=deque)
    down: deque[str] = attrs.field(factory=deque)
    ingest_buffer: list[tuple[int, m.ReliableMessage | None]] = attrs.field(factory=list)
    _ts: count[int] = attrs.field(factory=lambda: count(1))
    _ids: count[int] = attrs.field(factory=lambda: count(1))

    # --- device actions --------------------------------------------------------------------

    def produce(self, readings: int = 1) -> None:
        """The device samples `readings` instants and queues one telemetry message."""
        samples = []
        for _ in range(readings):
            ts = float(next(self._ts))
            samples.append(m.Sample(ts=ts, data={"voltage": 230.0 + ts % 7}))
        self._enqueue(m.Telemetry(seq=0, samples=tuple(samples)))
        self._pump_device()

    def _enqueue(self, message: m.ReliableMessage) -> None:
        seq = self.seqs.next()
        message = attrs.evolve(message, seq=seq)
        self.outbox[seq] = CODEC.encode(message)
        if isinstance(message, m.Telemetry):
            for sample in message.samples:
                self.produced[sample.ts] = seq

    def _pump_device(self) -> None:
        device = self.device
        if device is None:
            return
        while (event := device.next_event()) is not None:
            if isinstance(event, Acked):
                for seq in [s for s in self.outbox if s <= event.seq]:
                    del self.outbox[seq]
            elif isinstance(event, Dispatch):
                self.persisted_record = copy.deepcopy(self.record)  # persisted before executing
                message = event.message
                if isinstance(message, m.Command):
                    self.executions[message.id] = self.executions.get(message.id, 0) + 1
                    for state in (m.CommandState.RECEIVED, m.CommandState.SUCCEEDED):
                        result = m.CommandResult(seq=0, id=message.id, status=state)
                        self.record.update(result)
                        self._enqueue(result)
                    self.persisted_record = copy.deepcopy(self.record)
            elif isinstance(event, Redelivered):
                self._enqueue(event.last)
            elif isinstance(event, LinkDead):
                self.cut()
                return
        if device.state.value == "open":
            for seq in sorted(s for s in self.outbox if s > device.sent_high):
                if device.window_free() <= 0:
                    break
                device.send_reliable(seq, self.outbox[seq], self.now)
        self.up.extend(device.data_to_send())

    def replay_sent(self, n: int) -> None:
        """A careless client sends up to `n` already-sent outbox frames again."""
        if self.device is None:
            return
        again = sorted(s for s in self.outbox if s <= self.device.sent_high)[:n]
        self.up.extend(self.outbox[seq] for seq in again)

    # --- hub actions -----------------------------------------------------------------------

    def post_command(self, name: str = "ping") -> str:
        command = HubCommand(id=f"c{next(self._ids)}", name=name)
        self.commands[command.id] = command
        if self.hub is not None and self.hub.state.value == "open":
            self.hub.send(m.Command(id=command.id, name=name))
            command.status = "sent"
            self.down.extend(self.hub.data_to_send())
        return command.id

    def _pump_hub(self) -> None:
        hub = self.hub
        if hub is None:
            return
        while (event := hub.next_event()) is not None:
            if isinstance(event, HelloReceived):
                hub.accept(
                    session_id="x",
                    acked_seq=self.store.acked.get(event.hello.stream, 0),
                    config_version=0,
                    server_time=0,
                )
                for command in self.commands.values():
                    if command.status in ("pending", "sent"):
                        hub.send(m.Command(id=command.id, name=command.name))
                        command.status = "sent"
            elif isinstance(event, MessageReceived):
                self.ingest_buffer.append((event.seq, event.message))
            elif isinstance(event, CloseConnection):
                self.cut()
                return
        self.down.extend(hub.data_to_send())

    def store_commits(self, limit: int | None = None) -> None:
        """The ingest writer commits the oldest `limit` buffered messages (all by default) in one
        transaction, and the session acks; messages that arrived meanwhile wait for the next."""
        if not self.ingest_buffer:
            return
        stream = self.hub.stream if self.hub is not None else None
        batch = self.ingest_buffer[:limit]
        del self.ingest_buffer[: len(batch)]
        high = 0
        for seq, message in batch:
            self.store.committed_seqs.append(seq)
            high = max(high, seq)
            if isinstance(message, m.Telemetry):
                for sample in message.samples:
                    self.store.samples.setdefault(sample.ts, seq)
            elif isinstance(message, m.CommandResult):
                order = ["pending", "sent", "received", "running", "succeeded"]
                current = self.commands[message.id].status
                if order.index(message.status.value) > order.index(current):
                    self.commands[message.id].status = message.status.value
        assert stream is not None
        assert self.hub is not None
        last = batch[-1][0]  # hand-over order, as the ingest writer reports it
        mark = self.hub.ack_after(last)
        assert mark <= high
        self.store.acked[stream] = max(self.store.acked.get(stream, 0), mark)
        self.hub.committed(last)
        self._pump_hub()

    # --- the wire --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.device is not None and self.hub is not None

    def connect(self) -> None:
        if self.connected:
            return
        self.cut()
        hello = m.Hello(stream=self.stream, agent="model/1")
        self.device = DeviceSession(hello=hello, now=self.now, record=self.record, codec=CODEC)
        self.hub = HubSession(now=self.now, heartbeat_s=HEARTBEAT_S, codec=CODEC)
        self._pump_device()

    def cut(self) -> None:
        """The connection drops: frames in flight are lost; uncommitted ingest stays buffered
        (the hub process lives on and commits it)."""
        if self.device is not None:
            self.device.close()
        if self.hub is not None:
            self.hub.close()
            if self.ingest_buffer:
                # The real hub's ingest writer outlives the connection and still commits.
                self.store_commits()
        self.device = None
        self.hub = None
        self.up.clear()
        self.down.clear()

    def deliver_up(self, n: int) -> None:
        for _ in range(n):
            if not self.up or self.hub is None:
                return
            self.hub.receive_text(self.up.popleft(), self.now)
            self._pump_hub()

    def deliver_down(self, n: int) -> None:
        for _ in range(n):
            if not self.down or self.device is None:
                return
            self.device.receive_text(self.down.popleft(), self.now)
            self._pump_device()

    def restart_device(self) -> None:
        """kill -9 of the agent: only the disk survives."""
        self.cut()
        self.record = copy.deepcopy(self.persisted_record)
        self.seqs = SeqAllocator(last=max([self.seqs.last, *self.outbox]))

    def restart_hub(self) -> None:
        """kill -9 of the hub: the uncommitted ingest buffer is lost."""
        self.ingest_buffer.clear()
        self.hub = None
        self.cut()

    def advance(self, dt: float) -> None:
        self.now += dt
        for session in (self.device, self.hub):
            if session is None:
                continue
            deadline = session.next_deadline()
            if deadline is not None and self.now >= deadline:
                session.handle_timer(self.now)
        self._pump_device()
        self._pump_hub()

    def drain(self) -> None:
        """Reconnect and deliver everything until nothing moves."""
        for _ in range(10_000):
            if not self.connected:
                self.connect()
            before = (len(self.up), len(self.down), len(self.outbox), len(self.ingest_buffer))
            self.deliver_up(len(self.up))
            self.deliver_down(len(self.down))
            self.store_commits()
            self._pump_device()
            after = (len(self.up), len(self.down), len(self.outbox), len(self.ingest_buffer))
            if after == (0, 0, 0, 0) and before == after:
                return
        raise AssertionError("the pair never settled")
