"""Secrets sealed for one agent process, through PostgreSQL: X25519 between an ephemeral key
of the server's and the agent's, HKDF-SHA256, ChaCha20-Poly1305 bound to the job attempt.
The agent's private key is made when its process starts and never leaves its memory, so only
that process opens what was sealed for it; the database and the broker never see a value."""

import base64
import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


def _key(shared: bytes, context: bytes) -> ChaCha20Poly1305:
    derived = HKDF(hashes.SHA256(), 32, salt=None, info=b"ciproject secrets " + context)
    return ChaCha20Poly1305(derived.derive(shared))


def seal(public_key: str, plaintext: bytes, context: bytes) -> bytes:
    """`plaintext` for the holder of `public_key` (base64), bound to `context`."""
    ephemeral = X25519PrivateKey.generate()
    peer = X25519PublicKey.from_public_bytes(base64.b64decode(public_key))
    nonce = os.urandom(12)
    sealed = _key(ephemeral.exchange(peer), context).encrypt(nonce, plaintext, context)
    return ephemeral.public_key().public_bytes(**RAW) + nonce + sealed


class Opener:
    """An agent process's key pair."""

    def __init__(self):
        self._private = X25519PrivateKey.generate()
        self.public_key = base64.b64encode(self._private.public_key().public_bytes(**RAW)).decode()

    def open(self, sealed: bytes, context: bytes) -> bytes:
        sealed = bytes(sealed)
        peer, nonce, body = sealed[:32], sealed[32:44], sealed[44:]
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer))
        return _key(shared, context).decrypt(nonce, body, context)
