"""Secrets at rest: Fernet (AES-128-CBC with HMAC-SHA256) under keys of their own, never
SECRET_KEY. SECRETS_KEYS lists them newest first: the first encrypts, any of them decrypts
(MultiFernet), so a new key is put in front, `manage.py secret rotate` re-encrypts every value
with it, and the old one can then be dropped. Without SECRETS_KEYS (a development machine),
one key is kept in SECRETS_KEY_FILE, made on first use, readable by its owner only."""

import functools
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

from vault.errors import SecretKeyMissing


@functools.cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError as exc:
        raise SecretKeyMissing(f"CIPROJECT_SECRETS_KEYS: not Fernet keys ({exc})") from None


def fernet() -> MultiFernet:
    return _fernet(tuple(settings.SECRETS_KEYS) or (_key_file(settings.SECRETS_KEY_FILE),))


def _key_file(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes making it at once agree on one key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as file:
                file.write(new_key() + "\n")
    return path.read_text().strip()


def encrypt(value: str) -> bytes:
    return fernet().encrypt(value.encode())


def decrypt(token: bytes) -> str:
    try:
        return fernet().decrypt(bytes(token)).decode()
    except InvalidToken:
        raise SecretKeyMissing(
            "a secret cannot be decrypted with any key of CIPROJECT_SECRETS_KEYS (a key was"
            " dropped before `manage.py secret rotate` ran?)"
        ) from None


def rotate(token: bytes) -> bytes:
    """The same value under the first key."""
    return fernet().rotate(bytes(token))


def new_key() -> str:
    return Fernet.generate_key().decode()
