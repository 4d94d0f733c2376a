"""Units of the OTA and SSH-access handlers: image verification, the authorized_keys hook, the
expiry loop, and the agent's small HTTP client (against an in-process trio server)."""

from __future__ import annotations

import base64
import functools
import hashlib
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ems.edge.handlers.software_update import (
    PublicKeyError,
    load_public_key,
    params_fault,
    verify_image,
)
from ems.edge.handlers.ssh_access import (
    AuthorizedKeysFile,
    GrantRefused,
    KeyGrant,
    SshAccessHandler,
    duration_fault,
    expiry_time,
    key_line,
    parse_marker,
    public_key_fault,
    split_expired,
    write_atomically,
)
from ems.edge.http import DownloadError, HttpStatusError, TooLong, download, get_json
from ems.protocol import messages as m

KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
SSH_KEY = (
    KEY.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " me@host"
)


def pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def sig(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data)).decode()


# --- verification ------------------------------------------------------------------------------


@pytest.fixture
def image_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = bytes(range(256)) * 40
    path = tmp_path / "image.img"
    path.write_bytes(data)
    return path, data


def check(path: Path, data: bytes, **overrides: Any) -> str | None:
    fields: dict[str, Any] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "signature": None,
        "public_key": None,
    }
    fields.update(overrides)
    return verify_image(path, **fields)


def test_a_matching_image_passes(image_file: tuple[Path, bytes]) -> None:
    path, data = image_file
    assert check(path, data) is None
    assert check(path, data, signature=sig(KEY, data), public_key=KEY.public_key()) is None


def test_size_and_hash_mismatches_are_named(image_file: tuple[Path, bytes]) -> None:
    path, data = image_file
    assert check(path, data, size=len(data) + 1) == (
        f"size mismatch: expected {len(data) + 1} bytes, got {len(data)}"
    )
    wrong = hashlib.sha256(b"other").hexdigest()
    assert check(path, data, sha256=wrong).startswith(f"sha256 mismatch: expected {wrong}")
    # One byte changed in the file: the hash says so (the check reads the file itself).
    damaged = bytearray(data)
    damaged[1000] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert "sha256 mismatch" in (check(path, data) or "")
    # The download's own count and hash are trusted when given.
    assert check(path, data, actual_size=len(data) - 1) is not None


def test_signatures(image_file: tuple[Path, bytes]) -> None:
    path, data = image_file
    public = KEY.public_key()
    assert "bad signature" in (
        check(path, data, signature=sig(OTHER_KEY, data), public_key=public) or ""
    )
    assert "not signed" in (check(path, data, public_key=public) or "")
    assert "64-byte" in (check(path, data, signature="bm90IGEgc2ln", public_key=public) or "")
    assert "64-byte" in (check(path, data, signature="***", public_key=public) or "")
    # A signature over other bytes of the same length fails too.
    assert "bad signature" in (
        check(path, data, signature=sig(KEY, data[::-1]), public_key=public) or ""
    )
    # Without a configured key a signature is not checked.
    assert check(path, data, signature=sig(OTHER_KEY, data)) is None


def test_an_empty_image_is_verified_without_mmap(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert check(path, b"", signature=sig(KEY, b""), public_key=KEY.public_key()) is None
    assert "bad signature" in (
        check(path, b"", signature=sig(OTHER_KEY, b""), public_key=KEY.public_key()) or ""
    )


def test_load_public_key(tmp_path: Path) -> None:
    good = tmp_path / "good.pem"
    good.write_bytes(pem(KEY))
    assert load_public_key(good).public_bytes(Encoding.Raw, PublicFormat.Raw) == (
        KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    rsa = tmp_path / "rsa.pem"
    rsa.write_bytes(
        generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(PublicKeyError, match="not a PEM public key"):
        load_public_key(garbage)
    with pytest.raises(PublicKeyError, match="not an Ed25519 public key"):
        load_public_key(rsa)
    with pytest.raises(PublicKeyError, match="cannot read"):
        load_public_key(tmp_path / "missing.pem")


def update(**fields: Any) -> m.SoftwareUpdate:
    base: dict[str, Any] = {
        "id": "c1",
        "version": "1.0",
        "url": "/api/artifacts/" + "a" * 64,
        "sha256": "a" * 64,
        "size": 10,
    }
    base.update(fields)
    return m.SoftwareUpdate(**base)


@pytest.mark.parametrize(
    ("fields", "fault"),
    [
        ({}, None),
        ({"sha256": "A" * 64}, "sha256"),
        ({"sha256": "a" * 63}, "sha256"),
        ({"size": -1}, "size"),
        ({"url": "http://elsewhere.example/image"}, "url"),
        ({"url": "//elsewhere.example/image"}, "url"),
        ({"url": "/api/artifacts/x y"}, "url"),
        ({"version": ""}, "version"),
    ],
)
def test_params_fault(fields: dict[str, Any], fault: str | None) -> None:
    reason = params_fault(update(**fields))
    if fault is None:
        assert reason is None
    else:
        assert reason is not None
        assert reason.startswith(fault)


# --- SSH: pure functions -------------------------------------------------------------------------


def test_public_key_and_duration_checks() -> None:
    assert public_key_fault(SSH_KEY) is None
    assert public_key_fault(" ".join(SSH_KEY.split()[:2])) is None  # no comment
    blob = SSH_KEY.split()[1]
    for bad in (
        "",
        f"ssh-rsa {blob}",  # the blob is an ed25519 key
        f"ssh-dss {blob}",
        f"{SSH_KEY}\nssh-ed25519 {blob}",
        f'from="*" {SSH_KEY}',
        "ssh-ed25519 !!!!",
        f"ssh-ed25519 {blob[:-4]}",
        None,
    ):
        assert public_key_fault(bad) is not None, bad
    for good in (1, 1.5, 86_400):
        assert duration_fault(good) is None
    for bad in (0, 0.99, 86_401, float("nan"), float("inf"), "5", True, None):
        assert duration_fault(bad) is not None, bad


def test_key_line_and_marker_round_trip() -> None:
    grant = KeyGrant(
        command_id="abc123",
        public_key=" ".join(SSH_KEY.split()[:2]),
        expires_at_ms=1_700_000_000_500,
    )
    line = key_line(grant)
    expected_expiry = time.strftime("%Y%m%d%H%M%S", time.localtime(1_700_000_001))
    assert line == (f'expiry-time="{expected_expiry}" {grant.public_key} ems:abc123:1700000000500')
    assert expiry_time(1_700_000_000_000) == time.strftime(
        "%Y%m%d%H%M%S", time.localtime(1_700_000_000)
    )
    assert parse_marker(line) == ("abc123", 1_700_000_000_500)
    assert parse_marker(SSH_KEY) is None
    assert parse_marker("# ems:abc:notanumber") is None
    # An id with other characters goes in as a digest, never raw.
    odd = key_line(KeyGrant(command_id="a b\n", public_key=grant.public_key, expires_at_ms=1))
    marker = parse_marker(odd)
    assert marker is not None
    assert marker[0] != "a b\n"


def test_split_expired_keeps_foreign_lines_and_finds_the_next_expiry() -> None:
    lines = [
        "# a comment",
        "ssh-ed25519 AAAA owner",
        "ssh-ed25519 AAAA ems:one:1000",
        "ssh-ed25519 AAAA ems:two:3000",
        "ssh-ed25519 AAAA ems:three:2000",
    ]
    kept, expired, upcoming = split_expired(lines, now_ms=1000)
    assert expired == ["ssh-ed25519 AAAA ems:one:1000"]  # at its expiry: gone
    assert kept == [lines[0], lines[1], lines[3], lines[4]]
    assert upcoming == 2000
    assert split_expired(lines, now_ms=5000)[2] is None


def test_write_atomically_mode_600_and_no_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "ssh" / "authorized_keys"
    path.parent.mkdir()
    path.write_text("old\n")
    path.chmod(0o644)
    write_atomically(path, ["a", "b"])
    assert path.read_text() == "a\nb\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["authorized_keys"]
    fresh = tmp_path / "new" / "dir" / "keys"
    write_atomically(fresh, [])
    assert fresh.read_text() == ""
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700


# --- SSH: the authorized_keys hook ---------------------------------------------------------------


def test_hook_grants_revokes_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text("ssh-ed25519 AAAA owner's key\n")
    public = " ".join(SSH_KEY.split()[:2])
    hook = AuthorizedKeysFile(path)
    hook.grant(KeyGrant(command_id="c1", public_key=public, expires_at_ms=10_000))
    hook.grant(KeyGrant(command_id="c2", public_key=public, expires_at_ms=20_000))
    hook.grant(KeyGrant(command_id="c1", public_key=public, expires_at_ms=15_000))  # again
    lines = path.read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAA owner's key"
    assert [parse_marker(line) for line in lines[1:]] == [("c2", 20_000), ("c1", 15_000)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    assert hook.revoke_expired(now_ms=14_999) == 15_000
    assert len(path.read_text().splitlines()) == 3
    # A new instance (the agent restarted) reads the expiries from the file.
    restarted = AuthorizedKeysFile(path)
    assert restarted.revoke_expired(now_ms=15_000) == 20_000
    assert [parse_marker(x) for x in path.read_text().splitlines()[1:]] == [("c2", 20_000)]
    assert restarted.revoke_expired(now_ms=30_000) is None
    assert path.read_text() == "ssh-ed25519 AAAA owner's key\n"


def test_hook_refuses_another_user_and_tolerates_a_missing_file(tmp_path: Path) -> None:
    hook = AuthorizedKeysFile(tmp_path / "none" / "authorized_keys")
    assert hook.revoke_expired(now_ms=1) is None
    with pytest.raises(GrantRefused, match="root"):
        hook.grant(
            KeyGrant(command_id="c", public_key="ssh-ed25519 AAAA", expires_at_ms=5, user="root")
        )
    assert not (tmp_path / "none" / "authorized_keys").exists()


# --- SSH: the handler and its expiry loop (virtual time) ---------------------------------------


async def test_handler_grants_and_the_loop_removes_at_expiry(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Virtual time drives the loop; the small threshold lets the file writes (worker threads)
    # finish before the clock jumps.
    mock_clock.autojump_threshold = 0.05
    path = tmp_path / "authorized_keys"
    results: list[m.CommandResult] = []

    async def report(result: m.CommandResult) -> None:
        results.append(result)

    def wall_clock() -> float:
        return 1_800_000_000.0 + trio.current_time()

    handler = SshAccessHandler(hook=AuthorizedKeysFile(path), report=report, wall_clock=wall_clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.expire_forever)
        await handler.handle(m.SshAccess(id="c1", duration_s=1, public_key=SSH_KEY))
        (result,) = results
        assert result.status is m.CommandState.SUCCEEDED
        assert result.result is not None
        expires_at = result.result["expires_at"] / 1000
        assert parse_marker(path.read_text()) == ("c1", result.result["expires_at"])
        expiry = expires_at - wall_clock() + trio.current_time()  # on the (virtual) trio clock
        await trio.sleep_until(expiry - 0.1)
        assert path.read_text(), "removed before its expiry"
        await trio.sleep_until(expiry + 1.0)  # the contract: gone within a second of expiry
        assert path.read_text() == ""
        nursery.cancel_scope.cancel()

    await handler.handle(m.SshAccess(id="c2", duration_s=0, public_key=SSH_KEY))
    await handler.handle(m.SshAccess(id="c3", duration_s=5, public_key="ssh-ed25519 AAAA"))
    await handler.handle(m.SshAccess(id="c4", duration_s=5, public_key=SSH_KEY, user="root"))
    assert [(r.id, r.status) for r in results[1:]] == [
        ("c2", m.CommandState.REJECTED),
        ("c3", m.CommandState.REJECTED),
        ("c4", m.CommandState.REJECTED),
    ]
    assert path.read_text() == ""


# --- the HTTP client ---------------------------------------------------------------------------


Responder = Callable[[trio.SocketStream], Awaitable[None]]


async def serve(nursery: trio.Nursery, respond: Responder) -> str:
    """An HTTP server on 127.0.0.1 that reads one request head and runs `respond`."""

    async def handle(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
        assert b"authorization: bearer secret" in head.lower()
        await respond(stream)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def fixed(raw: bytes) -> Responder:
    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(raw)

    return respond


async def test_download_content_length_and_chunked(tmp_path: Path) -> None:
    body = bytes(range(256)) * 9000  # over FLUSH_BYTES: progress is reported
    chunked = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:1000], body[1000:])
    )
    progress: list[int] = []

    async def on_progress(done: int) -> None:
        progress.append(done)

    async with trio.open_nursery() as nursery:
        plain = await serve(
            nursery, fixed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        )
        got = await download(
            plain + "/a?x=1",
            tmp_path / "a",
            headers={"Authorization": "Bearer secret"},
            max_bytes=len(body),
            on_progress=on_progress,
        )
        assert (got.size, got.sha256) == (len(body), hashlib.sha256(body).hexdigest())
        assert (tmp_path / "a").read_bytes() == body
        assert progress[-1] == len(body)
        assert progress == sorted(progress)
        assert len(progress) >= 2

        chunks = await serve(
            nursery,
            fixed(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
            ),
        )
        got = await download(
            chunks, tmp_path / "b", headers={"Authorization": "Bearer secret"}, max_bytes=10**9
        )
        assert got.sha256 == hashlib.sha256(body).hexdigest()
        nursery.cancel_scope.cancel()


async def test_download_failures(tmp_path: Path) -> None:
    headers = {"Authorization": "Bearer secret"}
    async with trio.open_nursery() as nursery:
        short = await serve(nursery, fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"))
        with pytest.raises(DownloadError, match=r"closed|bad HTTP"):
            await download(short, tmp_path / "s", headers=headers, max_bytes=1000)
        long = await serve(
            nursery, fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        )
        with pytest.raises(TooLong):
            await download(long, tmp_path / "l", headers=headers, max_bytes=9)
        error = b'{"error":{"code":"NOT_FOUND","message":"no image"}}'
        missing = await serve(
            nursery,
            fixed(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(error) + error),
        )
        with pytest.raises(HttpStatusError, match="HTTP 404: no image") as caught:
            await download(missing, tmp_path / "m", headers=headers, max_bytes=10)
        assert caught.value.status == 404
        assert "secret" not in str(caught.value)
        json_body = b'{"ok": true}'
        answer = await serve(
            nursery,
            fixed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(json_body) + json_body),
        )
        assert await get_json(answer, headers=headers) == (200, {"ok": True})
        assert await get_json(missing, headers=headers) == (404, None)
        nursery.cancel_scope.cancel()
    # Nobody listening.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(DownloadError, match="could not connect"):
        await download(f"http://127.0.0.1:{port}/", tmp_path / "x", headers={}, max_bytes=1)
    with pytest.raises(DownloadError, match="http"):
        await download("ftp://host/x", tmp_path / "x", headers={}, max_bytes=1)
