"""The dispatcher: hub-to-device message type -> handler, one bounded queue, one owner task.

Handlers are registered in a table (built-ins in `ems.edge.handlers`, more through the entry
point group `ems.edge.handlers`: a callable taking the agent and returning a handler), so a new
feature is a new handler file. For messages with an `id` the dispatcher first makes the
`received` durable (command record + outbox, one transaction) and only then runs the handler: a
redelivery after any crash is answered from the record and never runs twice. A handler that
fails on one message is a boundary: the error is logged with its traceback and reported as
`failed`; the link and the other handlers go on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from typing import Any, Protocol

import attrs
import trio

from ems.logs import get_logger
from ems.protocol import messages as m

log = get_logger("ems.edge.dispatcher")

ENTRY_POINT_GROUP = "ems.edge.handlers"


class Handler(Protocol):
    message_type: str
    """The wire `type` this handler takes."""

    async def handle(self, message: Any) -> None: ...


def command_name(message: m.TrackedMessage) -> str:
    return message.name if isinstance(message, m.Command) else message.TYPE


@attrs.define(eq=False, kw_only=True)
class Dispatcher:
    handlers: dict[str, Handler]
    record_received: Callable[[str, str], Awaitable[None]]
    report: Callable[[m.CommandResult], Awaitable[None]]
    wall_clock: Callable[[], float]
    device_id: str = ""
    max_concurrent: int = 4
    queue_size: int = 64
    _send: trio.MemorySendChannel[Any] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Any] = attrs.field(init=False)
    _slots: trio.Semaphore = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(self.queue_size)
        self._slots = trio.Semaphore(self.max_concurrent)

    async def submit(self, message: m.TrackedMessage | m.Config) -> None:
        await self._send.send(message)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for message in self._receive:
                tracked = isinstance(message, m.TRACKED_TYPES)
                if tracked:
                    await self.record_received(message.id, command_name(message))
                    expires_at = getattr(message, "expires_at", None)
                    if expires_at is not None and expires_at <= self.wall_clock() * 1000:
                        await self.report(
                            self._result(message, m.CommandState.REJECTED, error="expired")
                        )
                        continue
                handler = self.handlers.get(message.TYPE)
                if handler is None:
                    if tracked:
                        await self.report(
                            self._result(
                                message,
                                m.CommandState.REJECTED,
                                error=f"{message.TYPE} is not supported by this agent",
                            )
                        )
                    continue
                await self._slots.acquire()
                nursery.start_soon(self._run_one, handler, message)

    async def _run_one(self, handler: Handler, message: Any) -> None:
        try:
            await handler.handle(message)
        except Exception as exc:
            log.exception(
                "handler_failed",
                device_id=self.device_id,
                type=message.TYPE,
                id=getattr(message, "id", None),
            )
            if isinstance(message, m.TRACKED_TYPES):
                await self.report(
                    self._result(
                        message, m.CommandState.FAILED, error=f"{type(exc).__name__}: {exc}"[:500]
                    )
                )
        finally:
            self._slots.release()

    @staticmethod
    def _result(
        message: m.TrackedMessage, status: m.CommandState, **fields: Any
    ) -> m.CommandResult:
        return m.CommandResult(seq=0, id=message.id, status=status, **fields)


def load_extra_handlers(agent: Any) -> dict[str, Handler]:
    """Handlers from installed packages (entry point group `ems.edge.handlers`)."""
    handlers: dict[str, Handler] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        factory = entry.load()
        handler = factory(agent)
        handlers[handler.message_type] = handler
        log.info("handler_loaded", name=entry.name, type=handler.message_type)
    return handlers
