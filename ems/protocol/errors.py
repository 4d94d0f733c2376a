"""Error and close codes of the wire contract, and the exceptions that carry them.

Every failure that crosses the wire has a code from the contract (protocol.md §1); an exception
class carries its code as a class attribute so drivers never invent codes of their own.
Remote errors are the peer's fault (bad input); local errors are ours (misuse of a session).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The `code` field of `error` messages and of REST errors."""

    AUTHENTICATION_FAILED = "AUTHENTICATION_FAILED"
    INVALID_MESSAGE_FORMAT = "INVALID_MESSAGE_FORMAT"
    TELEMETRY_VALIDATION_FAILED = "TELEMETRY_VALIDATION_FAILED"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
    COMMAND_EXECUTION_FAILED = "COMMAND_EXECUTION_FAILED"
    SUBSCRIPTION_FAILED = "SUBSCRIPTION_FAILED"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    NOT_FOUND = "NOT_FOUND"
    FORBIDDEN = "FORBIDDEN"
    CONFLICT = "CONFLICT"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the hub and the agent use."""

    NORMAL = 1000
    GOING_AWAY = 1001  # hub shutting down (after `goaway`)
    POLICY = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    REPLACED = 4000  # a newer connection of the same device took over
    NO_HELLO = 4001  # no `hello` in time, or a protocol violation
    SILENT = 4002  # nothing received for three heartbeat intervals
    REVOKED = 4003  # token rotated or device deleted while connected
    RATE_LIMITED = 4008


class EmsError(Exception):
    """Base of every EMS error; `code` is the contract's code for it."""

    code: ErrorCode = ErrorCode.INVALID_MESSAGE_FORMAT


class ProtocolError(EmsError):
    """A frame the peer sent cannot be accepted as a message (an envelope fault).

    `seq` and `id` name the offending message when they could be read, so the `error` reply can
    point at it and, for reliable messages, the hub can acknowledge it as rejected for good.
    """

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode = ErrorCode.INVALID_MESSAGE_FORMAT,
        seq: int | None = None,
        id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.seq = seq
        self.id = id

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value}, {self.message!r}, seq={self.seq}, id={self.id})"


class LocalProtocolError(EmsError):
    """Our own code misused a session (sent before `hello`, acked a seq never received...)."""
