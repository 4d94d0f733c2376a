"""`software_update`: download, verify, stage, install, health-check, roll back.

Steps, each reported through `command_result` (protocol.md §1, §3):

1. No installer configured (`EMS_OTA_INSTALL`): `rejected`. Malformed fields: `rejected`.
2. `EMS_OTA_PUBKEY_FILE` set and the message has no `signature`: `failed` before any download.
3. `running` (progress 0), then the image is downloaded from the hub (`url` is a hub path,
   fetched over HTTP(S) from the agent's hub with its device token) into `<data_dir>/ota/`,
   hashed on the way and cut off past the announced `size`; progress moves up to 80.
4. Verification: size, SHA-256, and the Ed25519 signature over the image's bytes when a public
   key is configured. Any mismatch ends `failed` ("verification failed: …") and the image is
   deleted: it never reaches the installer.
5. The installer argv runs with the staged image's path appended (never through a shell);
   a non-zero exit ends `failed`.
6. The health check argv runs (none configured: healthy). Exit 0: `succeeded` with the version,
   and `<data_dir>/ota/installed.json` records it. Otherwise the rollback argv runs (if any) and
   the update ends `failed` saying what the check and the rollback did.

The staged image is deleted whatever the outcome (the installer has copied what it needs).
`check_assigned` is the scheduled OTA check (`ota_check` job): it asks the hub for the device's
latest `software_update` and hands one the agent has never seen to the dispatcher, exactly as if
the link had delivered it (the at-most-once record makes both paths safe together).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mmap
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ems.edge.handlers.command import Outcome, run_argv
from ems.edge.http import DownloadError, TooLong, download, get_json
from ems.logs import get_logger
from ems.protocol import messages as m
from ems.protocol.codec import decode_hub_message
from ems.protocol.errors import ProtocolError

log = get_logger("ems.edge.software_update")

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HUB_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*(\?[\x21-\x7e]*)?$")
"""A path on the agent's own hub (never another host: the token goes with the request)."""
MAX_IMAGE_BYTES = 1 << 40
INSTALL_TIMEOUT_S = 1800.0
HEALTHCHECK_TIMEOUT_S = 300.0
ROLLBACK_TIMEOUT_S = 1800.0
DOWNLOAD_SHARE = 80
"""Progress 0..80 is the download; the rest is install and health check."""
PROGRESS_STEP = 10


class PublicKeyError(ValueError):
    """The configured public key cannot be used."""


# --- pure functions (unit-tested) --------------------------------------------------------------


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file `path`; raises PublicKeyError saying why not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PublicKeyError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise PublicKeyError(f"{str(path)!r} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PublicKeyError(f"{str(path)!r} is not an Ed25519 public key")
    return key


def params_fault(update: m.SoftwareUpdate) -> str | None:
    """Why the message's fields cannot be used (then it is `rejected`), or None."""
    if not SHA256_HEX.fullmatch(update.sha256):
        return "sha256: expected 64 lowercase hex digits"
    if type(update.size) is not int or not 0 <= update.size <= MAX_IMAGE_BYTES:
        return "size: expected a byte count"
    if not HUB_PATH.fullmatch(update.url) or update.url.startswith("//"):
        return "url: expected a path on the hub (/api/artifacts/...)"
    if not update.version:
        return "version: expected a version label"
    return None


def decode_signature(text: str) -> bytes | None:
    """The raw 64-byte signature from its base64, or None when it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


def verify_image(
    path: Path,
    *,
    size: int,
    sha256: str,
    signature: str | None,
    public_key: Ed25519PublicKey | None,
    actual_size: int | None = None,
    actual_sha256: str | None = None,
) -> str | None:
    """Why the image at `path` must not be installed, or None when it checks out.

    Size, then SHA-256 (computed here unless the download already did), then, with a public
    key, the Ed25519 signature over the file's bytes (read through mmap: no copy in memory)."""
    if actual_size is None:
        actual_size = path.stat().st_size
    if actual_size != size:
        return f"size mismatch: expected {size} bytes, got {actual_size}"
    if actual_sha256 is None:
        actual_sha256 = file_sha256(path)
    if actual_sha256 != sha256:
        return f"sha256 mismatch: expected {sha256}, got {actual_sha256}"
    if public_key is None:
        return None
    if signature is None:
        return "the image is not signed and a signature is required (EMS_OTA_PUBKEY_FILE)"
    raw = decode_signature(signature)
    if raw is None:
        return "signature: not the base64 of a 64-byte Ed25519 signature"
    try:
        with path.open("rb") as file:
            if actual_size == 0:
                public_key.verify(raw, b"")
            else:
                with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    public_key.verify(raw, data)
    except InvalidSignature:
        return "bad signature: the image is not signed by the configured key"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the handler -------------------------------------------------------------------------------


@attrs.define(eq=False, kw_only=True)
class SoftwareUpdateHandler:
    install: Sequence[str] | None
    healthcheck: Sequence[str] | None
    rollback: Sequence[str] | None
    pubkey_file: Path | None
    hub_http_url: str
    """`http(s)://host:port[/prefix]`; a message's `url` (a hub path) is appended."""
    read_token: Callable[[], str]
    work_dir: Path
    report: Callable[[m.CommandResult], Awaitable[None]]
    wall_clock: Callable[[], float]
    ssl_context: ssl.SSLContext | None = None
    device_id: str = ""
    install_timeout_s: float = INSTALL_TIMEOUT_S
    healthcheck_timeout_s: float = HEALTHCHECK_TIMEOUT_S
    rollback_timeout_s: float = ROLLBACK_TIMEOUT_S
    message_type: str = "software_update"
    _one_at_a_time: trio.Lock = attrs.field(init=False, factory=trio.Lock)

    async def handle(self, update: m.SoftwareUpdate) -> None:
        """One update at a time: a second one waits (as `received`) for the first to end."""
        async with self._one_at_a_time:
            await self._handle(update)

    async def _handle(self, update: m.SoftwareUpdate) -> None:
        async def report(status: m.CommandState, **fields: Any) -> None:
            await self.report(m.CommandResult(seq=0, id=update.id, status=status, **fields))

        if not self.install:
            await report(
                m.CommandState.REJECTED,
                error="software updates are not enabled on this device (no EMS_OTA_INSTALL)",
            )
            return
        fault = params_fault(update)
        if fault is not None:
            await report(m.CommandState.REJECTED, error=f"invalid params: {fault}")
            return
        public_key = None
        if self.pubkey_file is not None:
            try:
                public_key = await trio.to_thread.run_sync(load_public_key, self.pubkey_file)
            except PublicKeyError as exc:
                await report(m.CommandState.FAILED, error=f"EMS_OTA_PUBKEY_FILE: {exc}")
                return
            if update.signature is None:
                await report(
                    m.CommandState.FAILED,
                    error="verification failed: the image is not signed and a signature is "
                    "required (EMS_OTA_PUBKEY_FILE)",
                )
                return
        await report(m.CommandState.RUNNING, progress=0)
        await trio.to_thread.run_sync(lambda: self.work_dir.mkdir(parents=True, exist_ok=True))
        staged = self.work_dir / f"{update.sha256}-{secrets.token_hex(4)}.img"
        try:
            await self._run(update, staged, public_key, report)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: staged.unlink(missing_ok=True))

    async def _run(
        self,
        update: m.SoftwareUpdate,
        staged: Path,
        public_key: Ed25519PublicKey | None,
        report: Callable[..., Awaitable[None]],
    ) -> None:
        log.info(
            "ota_download",
            device_id=self.device_id,
            id=update.id,
            version=update.version,
            size=update.size,
        )
        reported = 0

        async def progress(done: int) -> None:
            nonlocal reported
            share = DOWNLOAD_SHARE * done // max(update.size, 1)
            if share >= reported + PROGRESS_STEP:
                reported = share - share % PROGRESS_STEP
                await report(m.CommandState.RUNNING, progress=reported)

        try:
            got = await download(
                self.hub_http_url + update.url,
                staged,
                headers={"Authorization": f"Bearer {self.read_token()}"},
                max_bytes=update.size,
                ssl_context=self.ssl_context,
                on_progress=progress,
            )
        except TooLong:
            await report(
                m.CommandState.FAILED,
                error=f"verification failed: size mismatch: more than the announced "
                f"{update.size} bytes",
            )
            return
        except DownloadError as exc:
            await report(m.CommandState.FAILED, error=f"download failed: {exc}")
            return
        reason = await trio.to_thread.run_sync(
            lambda: verify_image(
                staged,
                size=update.size,
                sha256=update.sha256,
                signature=update.signature,
                public_key=public_key,
                actual_size=got.size,
                actual_sha256=got.sha256,
            )
        )
        if reason is not None:
            log.warning("ota_rejected", device_id=self.device_id, id=update.id, reason=reason)
            await report(m.CommandState.FAILED, error=f"verification failed: {reason}")
            return
        await report(m.CommandState.RUNNING, progress=DOWNLOAD_SHARE)
        log.info("ota_install", device_id=self.device_id, id=update.id, version=update.version)
        installed = await run_argv([*(self.install or ()), str(staged)], self.install_timeout_s)
        if installed.status is not m.CommandState.SUCCEEDED:
            await report(
                m.CommandState.FAILED,
                result={"install": installed.result},
                error=f"installer failed: {installed.error}",
            )
            return
        await report(m.CommandState.RUNNING, progress=90)
        if self.healthcheck:
            health = await run_argv(self.healthcheck, self.healthcheck_timeout_s)
            if health.status is not m.CommandState.SUCCEEDED:
                await self._roll_back(update, installed, health, report)
                return
        await trio.to_thread.run_sync(self._record_installed, update)
        log.info("ota_succeeded", device_id=self.device_id, id=update.id, version=update.version)
        await report(
            m.CommandState.SUCCEEDED,
            progress=100,
            result={"version": update.version, "sha256": update.sha256, "size": update.size},
        )

    async def _roll_back(
        self,
        update: m.SoftwareUpdate,
        installed: Outcome,
        health: Outcome,
        report: Callable[..., Awaitable[None]],
    ) -> None:
        log.warning("ota_unhealthy", device_id=self.device_id, id=update.id, error=health.error)
        result: dict[str, Any] = {"install": installed.result, "healthcheck": health.result}
        if not self.rollback:
            error = f"health check failed ({health.error}); no rollback configured"
        else:
            undone = await run_argv(self.rollback, self.rollback_timeout_s)
            result["rollback"] = undone.result
            if undone.status is m.CommandState.SUCCEEDED:
                error = f"health check failed ({health.error}); rolled back"
            else:
                error = f"health check failed ({health.error}); rollback failed ({undone.error})"
        log.warning("ota_failed", device_id=self.device_id, id=update.id, error=error)
        await report(m.CommandState.FAILED, result=result, error=error)

    def _record_installed(self, update: m.SoftwareUpdate) -> None:
        record = {
            "version": update.version,
            "sha256": update.sha256,
            "id": update.id,
            "installed_at": self.wall_clock() * 1000,
        }
        temp = self.work_dir / "installed.json.tmp"
        temp.write_bytes(orjson.dumps(record))
        temp.replace(self.work_dir / "installed.json")

    # --- the scheduled check -------------------------------------------------------------------

    async def check_assigned(
        self, claim: Callable[[str], bool], submit: Callable[[m.SoftwareUpdate], Awaitable[None]]
    ) -> m.SoftwareUpdate | None:
        """Ask the hub for this device's latest `software_update`; submit it when it is still
        open on the hub and `claim(id)` says the id is new to the command record (and now in
        it). The message submitted, or None."""
        url = f"{self.hub_http_url}/api/devices/{self.device_id}/software-update"
        try:
            status, body = await get_json(
                url,
                headers={"Authorization": f"Bearer {self.read_token()}"},
                ssl_context=self.ssl_context,
            )
        except DownloadError as exc:
            log.warning("ota_check_failed", device_id=self.device_id, error=str(exc))
            return None
        if status == 404:
            log.debug("ota_check_none", device_id=self.device_id)
            return None
        if status != 200 or not isinstance(body, dict):
            log.warning("ota_check_failed", device_id=self.device_id, status=status)
            return None
        command = body.get("command") or {}
        message = body.get("message")
        if command.get("status") not in ("pending", "sent") or not isinstance(message, dict):
            return None  # already received (by the link) or finished or expired
        try:
            update = as_message(message)
        except ValueError as exc:
            log.warning("ota_check_bad_message", device_id=self.device_id, error=str(exc))
            return None
        if not claim(update.id):
            return None
        log.info("ota_check_found", device_id=self.device_id, id=update.id, version=update.version)
        await submit(update)
        return update


def as_message(message: dict[str, Any]) -> m.SoftwareUpdate:
    """A `software_update` wire message (as the hub's REST answer holds it) as a message."""
    try:
        decoded = decode_hub_message(orjson.dumps(message))
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(decoded, m.SoftwareUpdate):
        raise ValueError(f"expected a software_update, got {type(decoded).__name__}")
    return decoded
