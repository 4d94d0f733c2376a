"""A small HTTP/1.1 GET for the agent, on trio: a body streamed to a file, or a small JSON body.

Why not httpx: the agent already runs on trio, and h11 (the HTTP/1.1 state machine under
hypercorn, wsproto and httpx) comes with it, so a download is a plain trio task: cancelled at
once by the agent's shutdown or a deadline, no worker thread holding a socket, no extra
dependency on small devices. h11 does the framing (Content-Length, chunked, a body cut short);
this module only moves bytes. One request per connection (`Connection: close`), no redirects, no
compression; `https://` uses the agent's TLS context (its CA file, or the system's).

`download` writes the body through a worker thread in chunks of up to `FLUSH_BYTES`, hashing it
(SHA-256) on the way; it never holds the whole body, and a body longer than `max_bytes` is cut
off at once. Errors are `DownloadError`s whose message says why and never holds a header value.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import attrs
import h11
import orjson
import trio

from ems import __version__

FLUSH_BYTES = 1 << 20
RECEIVE_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 15.0
IDLE_TIMEOUT_S = 60.0
"""A transfer that receives nothing for this long has failed."""
JSON_MAX_BYTES = 1 << 20


class DownloadError(Exception):
    """The request failed; the message says why (never holds the token)."""


class HttpStatusError(DownloadError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class TooLong(DownloadError):
    """The body went past `max_bytes`."""


@attrs.frozen
class Downloaded:
    size: int
    sha256: str


@attrs.define(eq=False)
class _Exchange:
    """One GET on one connection: the status line, then the body chunk by chunk."""

    stream: trio.abc.Stream
    idle_timeout_s: float
    conn: h11.Connection = attrs.field(factory=lambda: h11.Connection(our_role=h11.CLIENT))
    status: int = 0

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self.conn.next_event()
            except h11.ProtocolError as exc:
                raise DownloadError(f"bad HTTP response: {exc}") from None
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(self.idle_timeout_s) as idle:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise DownloadError(f"connection lost: {exc}") from None
            if idle.cancelled_caught:
                raise DownloadError(f"nothing received for {self.idle_timeout_s} s")
            self.conn.receive_data(data)

    async def start(self, target: str, headers: list[tuple[str, str]]) -> int:
        try:
            await self.stream.send_all(
                self.conn.send(h11.Request(method="GET", target=target, headers=headers))
            )
            await self.stream.send_all(self.conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise DownloadError(f"connection lost: {exc}") from None
        event = await self._next_event()
        while isinstance(event, h11.InformationalResponse):
            event = await self._next_event()
        if not isinstance(event, h11.Response):
            raise DownloadError("the server closed the connection without an answer")
        self.status = event.status_code
        return self.status

    async def chunk(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        event = await self._next_event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise DownloadError("the connection closed before the body ended")

    async def body(self, limit: int) -> bytes:
        data = bytearray()
        while (piece := await self.chunk()) is not None:
            data += piece
            if len(data) > limit:
                raise TooLong(f"the body is longer than {limit} bytes")
        return bytes(data)

    async def error(self) -> HttpStatusError:
        """The hub's `{"error":{"message"}}` of a non-200 answer, as an exception."""
        text = "no body"
        with trio.move_on_after(5):
            try:
                raw = await self.body(4096)
                try:
                    text = str(orjson.loads(raw)["error"]["message"])[:200]
                except Exception:
                    text = raw[:200].decode(errors="replace") or text
            except DownloadError:
                pass
        return HttpStatusError(self.status, text)


async def _connect(
    url: str, ssl_context: ssl.SSLContext | None, connect_timeout_s: float
) -> tuple[trio.abc.Stream, str, str]:
    """An open stream to `url`'s host, the request target, and the Host header."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError("expected an http:// or https:// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    try:
        with trio.fail_after(connect_timeout_s):
            if parts.scheme == "https":
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    parts.hostname,
                    port,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    https_compatible=True,
                )
            else:
                stream = await trio.open_tcp_stream(parts.hostname, port)
    except trio.TooSlowError:
        raise DownloadError(f"could not connect within {connect_timeout_s} s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise DownloadError(f"could not connect: {exc}") from None
    return stream, target, host_header


def _headers(host: str, extra: dict[str, str]) -> list[tuple[str, str]]:
    return [
        ("Host", host),
        ("User-Agent", f"ems-edge/{__version__}"),
        ("Accept-Encoding", "identity"),
        ("Connection", "close"),
        *extra.items(),
    ]


async def download(
    url: str,
    dest: Path,
    *,
    headers: dict[str, str],
    max_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
    on_progress: Callable[[int], Awaitable[None]] | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> Downloaded:
    """GET `url` into `dest` (created or truncated): its size and SHA-256. Raises DownloadError
    for a status other than 200, a transport or framing error, or a body over `max_bytes`
    (TooLong). `on_progress(bytes so far)` is called after each flush to disk."""
    stream, target, host = await _connect(url, ssl_context, connect_timeout_s)
    async with stream:
        exchange = _Exchange(stream, idle_timeout_s)
        if await exchange.start(target, _headers(host, headers)) != 200:
            raise await exchange.error()
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        file: BinaryIO = await trio.to_thread.run_sync(dest.open, "wb")

        def flush(data: bytes) -> None:
            digest.update(data)
            file.write(data)

        try:
            while (piece := await exchange.chunk()) is not None:
                size += len(piece)
                if size > max_bytes:
                    raise TooLong(f"the body is longer than the expected {max_bytes} bytes")
                buffer += piece
                if len(buffer) >= FLUSH_BYTES:
                    data, buffer = bytes(buffer), bytearray()
                    await trio.to_thread.run_sync(flush, data)
                    if on_progress is not None:
                        await on_progress(size)
            await trio.to_thread.run_sync(flush, bytes(buffer))
            await trio.to_thread.run_sync(_sync_close, file)
        finally:
            if not file.closed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(file.close)
    if on_progress is not None:
        await on_progress(size)
    return Downloaded(size=size, sha256=digest.hexdigest())


async def get_json(
    url: str,
    *,
    headers: dict[str, str],
    ssl_context: ssl.SSLContext | None = None,
    max_bytes: int = JSON_MAX_BYTES,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> tuple[int, Any]:
    """GET `url`: the status and, for 200, the parsed JSON body (None otherwise)."""
    stream, target, host = await _connect(url, ssl_context, connect_timeout_s)
    async with stream:
        exchange = _Exchange(stream, idle_timeout_s)
        status = await exchange.start(target, _headers(host, headers))
        if status != 200:
            return status, None
        raw = await exchange.body(max_bytes)
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise DownloadError("the answer is not JSON") from None


def _sync_close(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()
