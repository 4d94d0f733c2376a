"""Secrets: device tokens, user passwords, login tokens, and the login attempt limiter.

Device and login tokens are 256-bit random strings; only their SHA-256 is stored (a fast hash is
right for high-entropy secrets) and compared in constant time. Passwords use scrypt (stdlib, a
memory-hard KDF) with a per-user salt. Nothing here ever logs a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import deque

import attrs

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
DEVICE_TOKEN_PREFIX = "emsd_"
USER_TOKEN_PREFIX = "emsu_"


def new_device_token() -> str:
    return DEVICE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_user_token() -> str:
    return USER_TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(token_hash(token), stored_hash)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    salt_b64 = base64.b64encode(salt).decode()
    digest_b64 = base64.b64encode(digest).decode()
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt_b64}${digest_b64}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# A hash to verify against when the user does not exist, so both cases take as long.
DUMMY_PASSWORD_HASH = hash_password(secrets.token_urlsafe(16))


@attrs.define
class LoginLimiter:
    """After `limit` failures for one username or one address within `window_s`, refuse every
    login (right password or not) until the oldest failure leaves the window."""

    limit: int = 10
    window_s: float = 60.0
    _failures: dict[str, deque[float]] = attrs.field(factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def blocked(self, username: str, address: str, now: float) -> bool:
        return any(
            len(self._recent(key, now)) >= self.limit
            for key in (f"user:{username}", f"addr:{address}")
        )

    def failed(self, username: str, address: str, now: float) -> None:
        for key in (f"user:{username}", f"addr:{address}"):
            self._failures.setdefault(key, deque()).append(now)

    def purge(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
