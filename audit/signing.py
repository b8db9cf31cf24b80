"""Ed25519 signing keys for a hospital node or the coordinator's server.

Each actor signs every audit-log line with its own key, so a line cannot be forged or altered
without the private key, and an auditor can tell the actors' logs apart by public key. The key
is a PEM file readable by its owner only (file 0600 in a 0700 folder); it is created on first
use, and later processes (a fresh ClientApp process per message) load the same key.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcare.atomic_files import replace_file
from fedcare.errors import FedcareError


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 key at ``path`` (PEM, PKCS#8, unencrypted), created there if absent.

    Creation is locked and atomic (temp file + rename), so two processes starting at once end up
    with the same key. A file that is not an Ed25519 key is an error, never overwritten.
    """
    path = Path(path)
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)  # mkdir's mode is masked by the umask
        with _locked(path.with_name(path.name + ".lock")):
            if not path.exists():
                key = Ed25519PrivateKey.generate()
                pem = key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                replace_file(path, pem)  # 0600
                return key
            data = path.read_bytes()
    except OSError as exc:
        raise FedcareError(
            f"cannot create or read the audit signing key {path}: {exc.strerror}",
            "point the key path at a private, writable folder",
        ) from None
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise FedcareError(
            f"{path} is not a readable PEM private key ({exc})",
            "restore the node's audit key; never replace it silently",
        ) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise FedcareError(
            f"{path} holds a {type(loaded).__name__}, not an Ed25519 key",
            "audit logs are signed with Ed25519 keys only",
        )
    return loaded


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of the public key (what each log line carries, hex-encoded)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """A 64-byte Ed25519 signature over ``data``."""
    return key.sign(data)


def verify_signature(pub_bytes: bytes, data: bytes, sig: bytes) -> bool:
    """True when ``sig`` is a valid signature of ``data`` by the raw public key; never raises."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(pub_bytes)).verify(bytes(sig), data)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path):
    fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
