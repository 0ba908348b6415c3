"""Secrets at rest: the master key file and AES-256-GCM sealing with it, passphrases.

Sealed format: b"RA1" + 12-byte nonce + ciphertext||tag, with the purpose string as associated
data, so a sealed DB password cannot be replayed as a sealed push-install credential.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import fileio
from .errors import SecretError

_MAGIC = b"RA1"
_NONCE_BYTES = 12
KEY_BYTES = 32
# No look-alike characters (0/O, 1/l/I) so a passphrase read aloud or retyped survives.
PASSPHRASE_ALPHABET = "".join(c for c in string.ascii_letters + string.digits if c not in "0O1lI")
PASSPHRASE_MIN_LENGTH = 16


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by the owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = fileio.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        fileio.pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def generate_passphrase(length: int = 24) -> str:
    if length < PASSPHRASE_MIN_LENGTH:
        raise ValueError(f"passphrase length {length} is too short: at least {PASSPHRASE_MIN_LENGTH}")
    return "".join(secrets.choice(PASSPHRASE_ALPHABET) for _ in range(length))


class MasterKey:
    """The appliance's key for secrets at rest (DB password, passphrase, push-install credentials)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretError(f"master key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._key = key

    @classmethod
    def create(cls, path: Path) -> MasterKey:
        if path.exists():
            raise SecretError(f"master key {path} already exists; refusing to overwrite it")
        key = AESGCM.generate_key(bit_length=256)
        write_private_file(path, key)
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> MasterKey:
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            raise SecretError(f"master key {path} is missing; run `appliance init` first") from None
        except PermissionError:
            raise SecretError(f"master key {path} is not readable by this account; run as the service account") from None
        return cls(key)

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _MAGIC + nonce + self._aead.encrypt(nonce, plaintext, purpose.encode())

    def open(self, sealed: bytes, purpose: str) -> bytes:
        if not sealed.startswith(_MAGIC) or len(sealed) < len(_MAGIC) + _NONCE_BYTES + 16:
            raise SecretError(f"sealed {purpose} is not in the appliance's format (truncated or foreign file)")
        nonce = sealed[len(_MAGIC):len(_MAGIC) + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[len(_MAGIC) + _NONCE_BYTES:], purpose.encode())
        except InvalidTag:
            raise SecretError(f"sealed {purpose} cannot be opened: wrong master key or the data was altered") from None

    def seal_text(self, text: str, purpose: str) -> bytes:
        return self.seal(text.encode("utf-8"), purpose)

    def open_text(self, sealed: bytes, purpose: str) -> str:
        return self.open(sealed, purpose).decode("utf-8")

    def derive(self, label: str) -> bytes:
        """A sub-key for one use (e.g. signing operator tokens), never the master key itself."""
        return hmac.new(self._key, b"derive:" + label.encode(), hashlib.sha256).digest()

    def store_secret(self, path: Path, text: str, purpose: str) -> None:
        write_private_file(path, self.seal_text(text, purpose))

    def load_secret(self, path: Path, purpose: str) -> str:
        try:
            return self.open_text(path.read_bytes(), purpose)
        except FileNotFoundError:
            raise SecretError(f"{purpose} file {path} is missing") from None
