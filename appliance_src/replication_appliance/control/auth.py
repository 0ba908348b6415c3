"""Operator passwords (argon2id), operator tokens (HMAC-signed, stateless) and the limiter
that slows down repeated wrong passphrases or passwords from one address."""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_ADMIN_PASSWORD_LENGTH = 12
TOKEN_LIFETIME_S = 8 * 3600
_hasher = PasswordHasher()  # argon2id, memory-hard (64 MiB, 3 passes by default)


def validate_admin_password(password: str) -> None:
    if len(password) < MIN_ADMIN_PASSWORD_LENGTH:
        raise ValueError(f"admin password is too short: at least {MIN_ADMIN_PASSWORD_LENGTH} characters")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def dummy_hash() -> str:
    """Verified against when the user does not exist, so a wrong user costs as much as a wrong password."""
    return hash_password("not-a-real-account-password")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class TokenSigner:
    key: bytes

    def issue(self, username: str, now: float | None = None) -> tuple[str, int]:
        expires = int((now or time.time()) + TOKEN_LIFETIME_S)
        payload = _b64(json.dumps({"u": username, "exp": expires}, separators=(",", ":")).encode())
        return f"{payload}.{_b64(self._sign(payload))}", expires

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The username the token was issued to, or None if it is forged, malformed or expired."""
        payload, _, sig = token.partition(".")
        try:
            if not hmac.compare_digest(_unb64(sig), self._sign(payload)):
                return None
            data = json.loads(_unb64(payload))
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), str) or not isinstance(data.get("exp"), int):
            return None
        return data["u"] if data["exp"] > (now or time.time()) else None

    def _sign(self, payload: str) -> bytes:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).digest()


@dataclass
class FailureLimiter:
    """After `max_failures` failures from one address within `window_s`, that address is
    refused for a lockout that doubles with every further failure (capped at `max_lockout_s`).

    Callers `reserve` an attempt before checking the secret and end it with `failed` or
    `succeeded` (or `release` when the check could not be made): attempts still being checked
    count as failures-to-be, so parallel requests get no more tries than sequential ones."""
    max_failures: int = 5
    window_s: float = 300.0
    base_lockout_s: float = 5.0
    max_lockout_s: float = 300.0
    busy_retry_s: float = 1.0  # what a caller refused for attempts in flight is told to wait
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _locked_until: dict[str, float] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, address: str) -> float:
        """Seconds this address must wait before trying again (0 = may try now)."""
        with self._lock:
            return max(0.0, self._locked_until.get(address, 0.0) - self.clock())

    def reserve(self, address: str) -> float:
        """Take an attempt for `address`: 0 if taken, else the seconds to wait. Up to the
        failures left before a lockout may be in flight at once; after a lockout ends, one."""
        now = self.clock()
        with self._lock:
            locked = self._locked_until.get(address, 0.0) - now
            if locked > 0:
                return locked
            recent = sum(1 for t in self._failures.get(address, []) if now - t < self.window_s)
            in_flight = self._in_flight.get(address, 0)
            if in_flight >= max(1, self.max_failures - recent):
                return self.busy_retry_s
            self._in_flight[address] = in_flight + 1
            return 0.0

    def release(self, address: str) -> None:
        """End a reserved attempt that neither failed nor succeeded (the check itself failed)."""
        with self._lock:
            self._release(address)

    def _release(self, address: str) -> None:
        left = self._in_flight.pop(address, 0) - 1
        if left > 0:
            self._in_flight[address] = left

    def failed(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            self._release(address)
            recent = [t for t in self._failures.get(address, []) if now - t < self.window_s] + [now]
            self._failures[address] = recent
            excess = len(recent) - self.max_failures
            if excess >= 0:
                self._locked_until[address] = now + min(self.base_lockout_s * 2 ** excess, self.max_lockout_s)
            if len(self._failures) > 10_000:  # bound memory under a spray of addresses
                self._forget_old(now)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._release(address)
            self._failures.pop(address, None)

    def _forget_old(self, now: float) -> None:
        for addr in [a for a, ts in self._failures.items() if not ts or now - ts[-1] >= self.window_s]:
            self._failures.pop(addr, None)
            if self._locked_until.get(addr, 0) <= now:
                self._locked_until.pop(addr, None)
