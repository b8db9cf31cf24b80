"""Expand a 32-byte seed into a uniform uint64 mask vector (ChaCha20 keystream).

Why ChaCha20 with a zero nonce: every seed is used for exactly one vector (pairwise seeds are
derived per run, round and pair; self-mask seeds are fresh per round), so the key alone
makes the stream unique, and the keystream of a secure stream cipher is indistinguishable
from uniform. Little-endian uint64 words make the output identical on every platform.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from secure_aggregation.errors import SecAggError

SEED_BYTES = 32
_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter (0) + 12-byte nonce (0)


def mask_vector(seed: bytes, length: int) -> np.ndarray:
    """Return ``length`` pseudo-random uint64 values determined by the 32-byte ``seed``."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed must be {SEED_BYTES} bytes")
    if length < 0:
        raise SecAggError(f"a mask length must be >= 0, got {length}")
    out = np.empty(length, dtype="<u8")
    if length:
        encryptor = Cipher(algorithms.ChaCha20(bytes(seed), _NONCE), mode=None).encryptor()
        encryptor.update_into(bytes(8 * length), memoryview(out).cast("B"))
    return out.astype(np.uint64, copy=False)
