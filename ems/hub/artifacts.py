"""Software images on the hub's disk, content-addressed: `<EMS_DATA_DIR>/artifacts/<sha256>`.

An upload is streamed to a temporary file in the same directory while its SHA-256 is computed,
then renamed to its hash (atomic: a reader sees the whole file or nothing; two uploads of the
same bytes end in the same file). Nothing holds a whole image in memory. The metadata (version,
signature, size) lives in the store (`ArtifactRow`); the file is the payload.

Writes go through a worker thread in chunks of up to `FLUSH_BYTES`, so the event loop never
blocks on the disk. With several hub processes (`EMS_REDIS_URL`) the directory must be shared
storage, or uploads must go to every hub: the store row says an image exists, the file has to be
where the serving hub looks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
VERSION = re.compile(r"^[\x21-\x7e]{1,128}$")
"""An artifact's version label: 1 to 128 printable ASCII characters, no spaces."""
SIGNATURE_BYTES = 64
"""An Ed25519 signature."""
FLUSH_BYTES = 1 << 20
READ_BYTES = 256 * 1024
TEMP_PREFIX = ".upload-"


class TooLarge(Exception):
    """The upload went past the size limit (the partial file is already gone)."""


class BadSignature(ValueError):
    """`X-Signature` is not the base64 of a 64-byte Ed25519 signature."""


def parse_signature(text: str) -> str:
    """The canonical base64 of an Ed25519 signature given as base64; raises BadSignature."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature("not valid base64") from None
    if len(raw) != SIGNATURE_BYTES:
        raise BadSignature(f"expected {SIGNATURE_BYTES} bytes (Ed25519), got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


@attrs.frozen
class Stored:
    sha256: str
    size: int


@attrs.define(eq=False)
class ArtifactFiles:
    root: Path

    def path(self, sha256: str) -> Path:
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError("not a lowercase hex SHA-256")
        return self.root / sha256

    def exists(self, sha256: str) -> bool:
        return SHA256_HEX.fullmatch(sha256) is not None and self.path(sha256).is_file()

    async def receive(self, chunks: AsyncIterable[bytes], *, limit: int) -> Stored:
        """Stream `chunks` to disk under their SHA-256; TooLarge past `limit` bytes."""
        await trio.to_thread.run_sync(lambda: self.root.mkdir(parents=True, exist_ok=True))
        temp = self.root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        file: BinaryIO = await trio.to_thread.run_sync(lambda: temp.open("xb"))
        done = False
        try:

            def flush(data: bytes) -> None:
                digest.update(data)
                file.write(data)

            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLarge(limit)
                buffer += chunk
                if len(buffer) >= FLUSH_BYTES:
                    data, buffer = bytes(buffer), bytearray()
                    await trio.to_thread.run_sync(flush, data)
            await trio.to_thread.run_sync(flush, bytes(buffer))
            sha256 = digest.hexdigest()

            def finish() -> None:
                file.flush()
                os.fsync(file.fileno())
                file.close()
                os.replace(temp, self.path(sha256))

            await trio.to_thread.run_sync(finish)
            done = True
            return Stored(sha256=sha256, size=size)
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_discard, file, temp)

    async def open(self, sha256: str) -> tuple[BinaryIO, int]:
        """The stored file, opened, and its size on disk; FileNotFoundError when it is gone."""

        def opened() -> tuple[BinaryIO, int]:
            file = self.path(sha256).open("rb")
            return file, os.fstat(file.fileno()).st_size

        return await trio.to_thread.run_sync(opened)


async def stream(file: BinaryIO) -> AsyncIterator[bytes]:
    """An opened file's bytes in chunks (a response body); closes the file when done."""
    try:
        while chunk := await trio.to_thread.run_sync(file.read, READ_BYTES):
            yield chunk
    finally:
        file.close()


def _discard(file: BinaryIO, temp: Path) -> None:
    try:
        file.close()
    finally:
        temp.unlink(missing_ok=True)
