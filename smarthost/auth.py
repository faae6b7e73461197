"""Inbound SMTP AUTH: the users file, password hashes, and a brake on guessing.

Hashes are scrypt (standard library, salted, deliberately slow):
`$scrypt$n=16384,r=8,p=1$SALT$HASH` with base64 salt and hash. `smarthost passwd`
makes them; `smtp.auth_users` holds `user:hash` lines. Clients that keep failing are
refused for a while without a hash being computed at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
import time
from collections import deque

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
_PREFIX = "$scrypt$"
MAX_FAILURES = 5  # per client address ...
FAILURE_WINDOW = 300.0  # ... within this many seconds, then refused until it passes


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 << 20
    )
    params = f"n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}"
    return f"{_PREFIX}{params}${_b64(salt)}${_b64(digest)}"


def verify_password(stored: str, password: str) -> bool:
    """Constant-time check of `password` against a `hash_password` result."""
    try:
        params, salt, digest = stored[len(_PREFIX) :].split("$")
        values = dict(item.split("=") for item in params.split(","))
        n, r, p = int(values["n"]), int(values["r"]), int(values["p"])
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            password.encode(), salt=_unb64(salt), n=n, r=r, p=p, maxmem=64 << 20
        )
    except (ValueError, KeyError):
        return False
    return stored.startswith(_PREFIX) and hmac.compare_digest(actual, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def load_users(path: str) -> dict[str, str]:
    """`user:hash` lines; blank lines and `#` comments are skipped."""
    users = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, stored = line.partition(":")
            if not sep or not user or not stored.startswith(_PREFIX):
                raise ValueError(f"{path}:{number}: expected user:hash (from smarthost passwd)")
            users[user] = stored
    return users


class FailureBrake:
    """Counts failed logins per client; too many within the window blocks it."""

    def __init__(self, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> bool:
        with self._lock:
            return len(self._recent(client, time.monotonic())) >= self.limit

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client, time.monotonic()).append(time.monotonic())

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.setdefault(client, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times
