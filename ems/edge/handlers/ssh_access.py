"""`ssh_access`: a public key that may log in for `duration_s` seconds, then never again.

The handler checks the message (duration 1..86400 s, one OpenSSH public key line), asks its
hook to grant the key until `expires_at`, answers `succeeded` with `expires_at` (epoch ms), and
wakes the expiry loop. The expiry loop (`expire_forever`, run by the agent's scheduler) asks the
hook to remove every key whose time has come and sleeps until the next expiry, or until a new
grant: a key is gone within a second of its expiry. The expiries live in the managed file, so
after a restart (even a `kill -9`) the first pass removes what expired meanwhile and the loop
schedules the rest.

Hooks (`SshKeyHook`) keep the mechanism replaceable: the default `AuthorizedKeysFile` manages a
dedicated authorized_keys file (`EMS_SSH_AUTHORIZED_KEYS`); another one (a PAM module, an SSH CA,
a different user's file) can be put in by registering an `ssh_access` handler through the entry
point group `ems.edge.handlers` that builds `SshAccessHandler(hook=...)`.

The file's format: each key we add is one line

    expiry-time="20251122093000" ssh-ed25519 AAAA… ems:<command id>:<expires at, epoch ms>

`expiry-time` (OpenSSH ≥ 8.2, the system's time zone, rounded up to the second) makes sshd
refuse the key past its expiry even if the agent is not running; the `ems:` marker tells our
lines and their expiries from anything else in the file, which is left as it is. The file is
replaced atomically (temporary file in the same directory, fsync, rename), mode 600.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import attrs
import trio

from ems.logs import get_logger
from ems.protocol import messages as m

log = get_logger("ems.edge.ssh_access")

MAX_DURATION_S = 86_400
MAX_SLEEP_S = 60.0
"""The expiry loop looks again at least this often (a wall-clock step is caught then)."""
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
)
KEY_LINE = re.compile(
    r"^(" + "|".join(re.escape(t) for t in KEY_TYPES) + r") ([A-Za-z0-9+/]+={0,2})"
    r"(?: ([\x20-\x7e]{1,256}))?$"
)
MARKER = re.compile(r"^ems:([A-Za-z0-9_.-]{1,128}):(\d{1,16})$")
SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class GrantRefused(Exception):
    """The hook cannot grant this request (answered `rejected` with the message)."""


@attrs.frozen(kw_only=True)
class KeyGrant:
    command_id: str
    public_key: str
    """Type and base64 (the caller's comment is dropped)."""
    expires_at_ms: int
    user: str | None = None


class SshKeyHook(Protocol):
    """Where granted keys go. Called from a worker thread, one call at a time."""

    def grant(self, grant: KeyGrant) -> None:
        """Let the key in until `grant.expires_at_ms`; raise GrantRefused to refuse."""

    def revoke_expired(self, now_ms: float) -> int | None:
        """Remove every key whose expiry is at or before `now_ms`; the earliest expiry still
        ahead (epoch ms), or None when no key is left."""


# --- pure functions (unit-tested) --------------------------------------------------------------


def public_key_fault(key: object) -> str | None:
    """Why `key` is not one OpenSSH public key line we accept, or None."""
    if not isinstance(key, str) or len(key) > 16_384:
        return "expected a string of at most 16384 characters"
    match = KEY_LINE.fullmatch(key)
    if match is None:
        return "expected one line: ssh-ed25519|ssh-rsa|ecdsa-sha2-* <base64> [comment]"
    try:
        blob = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return "the key is not valid base64"
    fields = _ssh_strings(blob)
    key_type = match.group(1)
    if not fields or fields[0] != key_type.encode():
        return "the key's data does not match its type"
    if key_type == "ssh-ed25519":
        ok = len(fields) == 2 and len(fields[1]) == 32
    elif key_type == "ssh-rsa":
        ok = len(fields) == 3 and len(fields[2]) >= 128  # e, n (at least 1024 bits)
    else:  # ecdsa-sha2-<curve>: the curve name, then the point
        ok = len(fields) == 3 and fields[1] == key_type.rsplit("-", 1)[1].encode()
    return None if ok else "the key's data is not a whole key of its type"


def _ssh_strings(blob: bytes) -> list[bytes] | None:
    """The SSH wire format's length-prefixed strings that make up `blob` exactly, or None."""
    fields = []
    at = 0
    while at < len(blob):
        if at + 4 > len(blob):
            return None
        size = int.from_bytes(blob[at : at + 4], "big")
        at += 4
        if at + size > len(blob):
            return None
        fields.append(blob[at : at + size])
        at += size
    return fields


def duration_fault(duration: object) -> str | None:
    if (
        type(duration) not in (int, float)
        or not math.isfinite(duration)  # type: ignore[arg-type]
        or not 1 <= duration <= MAX_DURATION_S  # type: ignore[operator]
    ):
        return f"duration_s: expected 1 to {MAX_DURATION_S} seconds"
    return None


def marker_id(command_id: str) -> str:
    """The command id as it goes into the marker (a digest if it has other characters)."""
    if SAFE_ID.fullmatch(command_id):
        return command_id
    return hashlib.sha256(command_id.encode()).hexdigest()[:32]


def expiry_time(expires_at_ms: float) -> str:
    """OpenSSH's `expiry-time` value: local time, rounded up to the second."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(math.ceil(expires_at_ms / 1000)))


def key_line(grant: KeyGrant) -> str:
    key_type, blob = grant.public_key.split(" ")[:2]
    return (
        f'expiry-time="{expiry_time(grant.expires_at_ms)}" {key_type} {blob} '
        f"ems:{marker_id(grant.command_id)}:{int(grant.expires_at_ms)}"
    )


def parse_marker(line: str) -> tuple[str, int] | None:
    """(command id, expires at ms) of a line we wrote; None for any other line."""
    for token in line.split():
        match = MARKER.fullmatch(token)
        if match is not None:
            return match.group(1), int(match.group(2))
    return None


def split_expired(lines: list[str], now_ms: float) -> tuple[list[str], list[str], int | None]:
    """The lines to keep, the managed lines that expired, and the next expiry still ahead."""
    kept: list[str] = []
    expired: list[str] = []
    upcoming: int | None = None
    for line in lines:
        marker = parse_marker(line)
        if marker is None:
            kept.append(line)
        elif marker[1] <= now_ms:
            expired.append(line)
        else:
            kept.append(line)
            upcoming = marker[1] if upcoming is None else min(upcoming, marker[1])
    return kept, expired, upcoming


def write_atomically(path: Path, lines: list[str]) -> None:
    """Replace `path` with `lines` (mode 600): temp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write("".join(f"{line}\n" for line in lines))
            file.flush()
            os.fchmod(file.fileno(), 0o600)
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@attrs.define(eq=False)
class AuthorizedKeysFile:
    """The default hook: one authorized_keys file, our lines marked, everything else kept."""

    path: Path
    device_id: str = ""
    """For log lines only."""

    def _read(self) -> list[str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return text.splitlines()

    def grant(self, grant: KeyGrant) -> None:
        if grant.user is not None:
            raise GrantRefused(
                f"this agent manages one authorized_keys file ({self.path.name}); "
                f"access for user {grant.user!r} is not supported"
            )
        mine = marker_id(grant.command_id)
        kept = [line for line in self._read() if (parse_marker(line) or ("",))[0] != mine]
        write_atomically(self.path, [*kept, key_line(grant)])

    def revoke_expired(self, now_ms: float) -> int | None:
        lines = self._read()
        kept, expired, upcoming = split_expired(lines, now_ms)
        if expired:
            write_atomically(self.path, kept)
            for line in expired:
                command_id, expires = parse_marker(line) or ("?", 0)
                log.info(
                    "ssh_key_revoked",
                    device_id=self.device_id,
                    id=command_id,
                    expires_at=expires,
                    late_ms=round(now_ms - expires, 1),
                )
        return upcoming


# --- the handler -------------------------------------------------------------------------------


@attrs.define(eq=False, kw_only=True)
class SshAccessHandler:
    hook: SshKeyHook
    report: Callable[[m.CommandResult], Awaitable[None]]
    wall_clock: Callable[[], float]
    device_id: str = ""
    message_type: str = "ssh_access"
    _lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)

    async def handle(self, request: m.SshAccess) -> None:
        async def report(status: m.CommandState, **fields: object) -> None:
            await self.report(m.CommandResult(seq=0, id=request.id, status=status, **fields))  # type: ignore[arg-type]

        fault = duration_fault(request.duration_s)
        key_fault = public_key_fault(request.public_key)
        if fault is None and key_fault is not None:
            fault = f"public_key: {key_fault}"
        if fault is not None:
            await report(m.CommandState.REJECTED, error=f"invalid params: {fault}")
            return
        expires_at = int(self.wall_clock() * 1000 + request.duration_s * 1000)
        key_type, blob = request.public_key.split(" ")[:2]
        grant = KeyGrant(
            command_id=request.id,
            public_key=f"{key_type} {blob}",
            expires_at_ms=expires_at,
            user=request.user,
        )
        try:
            async with self._lock:
                await trio.to_thread.run_sync(self.hook.grant, grant)
        except GrantRefused as exc:
            await report(m.CommandState.REJECTED, error=str(exc))
            return
        except OSError as exc:
            await report(m.CommandState.FAILED, error=f"could not write the key: {exc}")
            return
        self._changed.set()
        log.info(
            "ssh_key_granted",
            device_id=self.device_id,
            id=request.id,
            key_type=key_type,
            expires_at=expires_at,
        )
        await report(m.CommandState.SUCCEEDED, result={"expires_at": expires_at})

    async def revoke_expired(self) -> int | None:
        """One pass: remove what has expired; the next expiry (epoch ms) or None."""
        async with self._lock:
            return await trio.to_thread.run_sync(self.hook.revoke_expired, self.wall_clock() * 1000)

    async def expire_forever(self) -> None:
        """Remove keys as they expire, forever (a scheduler job that runs once and stays)."""
        while True:
            self._changed = trio.Event()  # before the pass: a grant during it wakes us again
            upcoming = await self.revoke_expired()
            delay = MAX_SLEEP_S
            if upcoming is not None:
                delay = min(MAX_SLEEP_S, max(0.0, upcoming / 1000 - self.wall_clock()))
            with trio.move_on_after(delay):
                await self._changed.wait()
