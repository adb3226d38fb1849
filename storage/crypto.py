"""Secrets at rest: AES-256-GCM envelopes bound to the kind of secret (docs/storage.md, Secrets at rest)."""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASK = "********"
ENVELOPE_KEY = "__encrypted__"
KEY_ENV = "DATAMACHINE_SECRET_KEY"
KEY_FILE = "secret.key"


class SecretKeyError(RuntimeError):
    """The secret key is missing, malformed or its file is readable by others."""


class SecretUnavailable(RuntimeError):
    """An envelope cannot be decrypted (wrong key or wrong kind)."""


def is_envelope(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(ENVELOPE_KEY), str)


def mask(value: Any) -> Any:
    """Replace every envelope inside ``value`` with the mask string (client-facing reads)."""
    if is_envelope(value):
        return MASK
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


class SecretBox:
    """Encrypts and decrypts JSON values with one 32-byte key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SecretKeyError("the secret key must be 32 bytes")
        self._key = key
        self._cipher: AESGCM | None = None

    @property
    def _aead(self) -> AESGCM:
        # cryptography is imported on the first secret, not at every start of a process
        if self._cipher is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._cipher = AESGCM(self._key)
        return self._cipher

    def encrypt(self, value: Any, kind: str) -> dict[str, str]:
        nonce = os.urandom(12)
        plaintext = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
        sealed = nonce + self._aead.encrypt(nonce, plaintext, kind.encode())
        return {ENVELOPE_KEY: "v1:" + base64.urlsafe_b64encode(sealed).decode().rstrip("=")}

    def decrypt(self, envelope: Any, kind: str) -> Any:
        if not is_envelope(envelope):
            raise SecretUnavailable("not an encryption envelope")
        token = envelope[ENVELOPE_KEY]
        if not token.startswith("v1:"):
            raise SecretUnavailable("unknown envelope version")
        from cryptography.exceptions import InvalidTag

        try:
            raw = base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4))
            plaintext = self._aead.decrypt(raw[:12], raw[12:], kind.encode())
        except (InvalidTag, ValueError, binascii.Error) as exc:
            raise SecretUnavailable(f"cannot decrypt secret of kind {kind!r}") from exc
        return json.loads(plaintext)


def load_key(data_dir: Path) -> bytes:
    """The key from ``DATAMACHINE_SECRET_KEY`` (base64), else ``$DATA_DIR/secret.key`` (created 0600)."""
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            key = base64.b64decode(env.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SecretKeyError(f"{KEY_ENV} is not valid base64") from exc
        if len(key) != 32:
            raise SecretKeyError(f"{KEY_ENV} must decode to 32 bytes, got {len(key)}")
        return key
    path = data_dir / KEY_FILE
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SecretKeyError(f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")
        key = path.read_bytes()
        if len(key) != 32:
            raise SecretKeyError(f"{path} must hold exactly 32 bytes")
        return key
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = os.urandom(32)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process created the key first; then theirs wins.
        os.link(tmp, path)
    except FileExistsError:
        key = path.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return key
