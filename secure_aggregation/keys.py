"""Key agreement, key derivation and authenticated encryption for secure aggregation.

All primitives come from ``cryptography``: X25519 (raw 32-byte keys), HKDF-SHA256, AES-256-GCM.
Every derived key is domain-separated by a label and by the context it belongs to (protocol
version, run, round, the unordered node pair), so a key can never be reused for another purpose
or another run/round. Every ciphertext's associated data binds (version, run, round, stage,
sender, recipient): a share replayed into another run, round or stage, re-labelled as coming
from another sender, or corrupted by a single bit fails to open.
"""

from __future__ import annotations

import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from secure_aggregation.errors import SecAggError, TamperingDetected

PROTOCOL = "fedcare-secagg"
VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
_SALT = b"fedcare-secagg-v1"

RunId = int | str


def _context(*fields: object) -> bytes:
    """Unambiguous byte encoding of a derivation/AAD context (JSON array, no spaces)."""
    return json.dumps([PROTOCOL, VERSION, *fields], separators=(",", ":")).encode()


def generate_keypair() -> tuple[bytes, bytes]:
    """Return a fresh X25519 key pair as (private raw 32 bytes, public raw 32 bytes)."""
    sk = X25519PrivateKey.generate()
    return (
        sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def public_key_of(private: bytes) -> bytes:
    """The raw public key that belongs to a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(my_private: bytes, peer_public: bytes, peer: object = "peer") -> bytes:
    """X25519 shared secret of my raw private key and a peer's raw public key.

    Raises TamperingDetected naming ``peer`` for a malformed or low-order public key.
    """
    try:
        return X25519PrivateKey.from_private_bytes(my_private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise TamperingDetected(
            f"public key of node {peer} is not a valid X25519 key ({exc})",
            "the key was corrupted or forged in transit; restart the run's setup",
        ) from None


def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_SALT, info=info).derive(shared)


def mask_seed(shared: bytes, run_id: RunId, round_: int, u: int, v: int) -> bytes:
    """PRG seed of the pairwise mask between nodes u and v in one round (from the s-key agreement)."""
    lo, hi = sorted((int(u), int(v)))
    return _hkdf(shared, _context("pairwise-mask", run_id, int(round_), lo, hi))


def encryption_key(shared: bytes, run_id: RunId, u: int, v: int) -> bytes:
    """AES-256-GCM key for shares exchanged between nodes u and v in a run (from the c-key agreement)."""
    lo, hi = sorted((int(u), int(v)))
    return _hkdf(shared, _context("share-encryption", run_id, lo, hi))


def aad(run_id: RunId, round_: int, stage: str, sender: int, recipient: int) -> bytes:
    """Associated data that binds a ciphertext to its run, round, stage and direction."""
    return _context("aad", run_id, int(round_), stage, int(sender), int(recipient))


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encrypt with a random 12-byte nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Decrypt what ``seal`` produced; raises ``InvalidTag`` if anything does not match."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < NONCE_BYTES + 16:
        raise InvalidTag()
    return AESGCM(key).decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), associated_data)


def open_share(key: bytes, blob: bytes, run_id: RunId, round_: int, stage: str, sender: int, recipient: int) -> bytes:
    """Open a share ciphertext, raising TamperingDetected that names the sender on any failure."""
    try:
        return open_sealed(key, blob, aad(run_id, round_, stage, sender, recipient))
    except InvalidTag:
        raise TamperingDetected(
            f"{stage} from node {sender} for round {round_} failed authentication "
            "(wrong run/round, replayed or corrupted)",
            "drop this node's contribution and check the transport; never reuse the ciphertext",
        ) from None


def check_key_bytes(value: object, what: str) -> bytes:
    """Return ``value`` as bytes if it is a 32-byte raw key, else raise SecAggError naming ``what``."""
    if not isinstance(value, (bytes, bytearray)) or len(value) != KEY_BYTES:
        raise SecAggError(f"{what} must be a {KEY_BYTES}-byte raw X25519 key")
    return bytes(value)
