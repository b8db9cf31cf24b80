"""t-of-n Shamir secret sharing over the prime field GF(2**521 - 1).

Why this field: one field element holds a whole secret of up to 40 bytes (the 32-byte keys and
seeds used here) plus a header and a checksum, so there is no chunking, and the Mersenne prime
keeps the arithmetic plain Python integers. A node id ``i`` (an int in [0, 2**64)) is the
x-coordinate ``i + 1``: distinct ids give distinct, non-zero points.

The secret is encoded as the integer of ``0x01 || len(secret) || secret || SHA-256(secret)[:16]``;
a combination without a valid header and checksum (too few, wrong or corrupted shares, even a
one-bit change of one share) is rejected instead of returning a wrong secret. With more than
t shares, the extra ones are also checked against the polynomial the first t define.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Iterable, Mapping

from secure_aggregation.errors import ShamirError

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 40
_TAG_BYTES = 16
MAX_NODE_ID = 2**64 - 1


def x_coordinate(node_id: int) -> int:
    """The field point of a node: its id plus one (ids are ints in [0, 2**64))."""
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id <= MAX_NODE_ID:
        raise ShamirError(f"node id {node_id!r} must be an int in [0, 2**64) to be a Shamir point")
    return node_id + 1


def _tag(secret: bytes) -> bytes:
    return hashlib.sha256(b"fedcare-secagg-shamir" + secret).digest()[:_TAG_BYTES]


def _encode(secret: bytes) -> bytes:
    return b"\x01" + bytes([len(secret)]) + secret + _tag(secret)


def _decode(raw: bytes) -> bytes | None:
    if len(raw) < 2 + _TAG_BYTES or raw[0] != 1 or raw[1] != len(raw) - 2 - _TAG_BYTES:
        return None
    secret, tag = raw[2:-_TAG_BYTES], raw[-_TAG_BYTES:]
    return secret if tag == _tag(secret) else None


def _eval(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, t: int, node_ids: Iterable[int]) -> dict[int, bytes]:
    """Split ``secret`` so that any ``t`` of the returned shares (keyed by node id) recover it."""
    ids = list(node_ids)
    xs = [x_coordinate(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ShamirError("Shamir split needs distinct node ids")
    if not 1 <= t <= len(ids):
        raise ShamirError(f"Shamir threshold {t} must be between 1 and the number of holders ({len(ids)})")
    if not isinstance(secret, (bytes, bytearray)) or len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"Shamir secret must be bytes of length <= {MAX_SECRET_BYTES}")
    encoded = int.from_bytes(_encode(bytes(secret)), "big")
    coeffs = [encoded] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    return {i: _eval(coeffs, x).to_bytes(SHARE_BYTES, "big") for i, x in zip(ids, xs)}


@functools.lru_cache(maxsize=4096)
def _lagrange_weights(xs: tuple[int, ...], x: int) -> tuple[int, ...]:
    """Weights w_j with f(x) = sum_j w_j f(xs[j]) for any polynomial f of degree < len(xs).

    They depend only on the points, not on the shares: the server combines one secret per
    survivor from the same survivors' shares, so a round computes them once per point instead of
    once per secret (at 100 hospitals that was O(N t^2) big-integer products a round)."""
    t = len(xs)
    # numerators prod_{m != j} (x - x_m) from prefix and suffix products: O(t)
    diffs = [(x - xm) % PRIME for xm in xs]
    prefix, suffix = [1] * (t + 1), [1] * (t + 1)
    for j in range(t):
        prefix[j + 1] = prefix[j] * diffs[j] % PRIME
        suffix[t - 1 - j] = suffix[t - j] * diffs[t - 1 - j] % PRIME
    # denominators prod_{m != j} (x_j - x_m): O(t^2) products, then one modular inverse for all of
    # them (Montgomery's batch inversion) instead of one ``pow`` each
    dens = []
    for j, xj in enumerate(xs):
        den = 1
        for m, xm in enumerate(xs):
            if m != j:
                den = den * (xj - xm) % PRIME
        dens.append(den)
    running = [1] * (t + 1)
    for j in range(t):
        running[j + 1] = running[j] * dens[j] % PRIME
    inverse = pow(running[t], -1, PRIME)
    inverses = [0] * t
    for j in range(t - 1, -1, -1):
        inverses[j] = inverse * running[j] % PRIME
        inverse = inverse * dens[j] % PRIME
    return tuple(prefix[j] * suffix[j + 1] % PRIME * inverses[j] % PRIME for j in range(t))


def _lagrange_at(points: list[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the polynomial through ``points`` (distinct xs)."""
    weights = _lagrange_weights(tuple(xj for xj, _ in points), x)
    return sum(w * yj for w, (_, yj) in zip(weights, points)) % PRIME


def combine(shares: Mapping[int, bytes], t: int) -> bytes:
    """Recover the secret from at least ``t`` shares keyed by node id.

    Raises ShamirError for fewer than t shares, malformed shares, extra shares that disagree
    with the first t, or a result that is not a valid encoded secret.
    """
    if t < 1 or len(shares) < t:
        raise ShamirError(f"{len(shares)} Shamir shares given but {t} are needed to recover the secret")
    points: list[tuple[int, int]] = []
    for node_id in sorted(shares):
        share = shares[node_id]
        if not isinstance(share, (bytes, bytearray)) or len(share) != SHARE_BYTES:
            raise ShamirError(f"Shamir share of node {node_id} is malformed ({SHARE_BYTES} bytes expected)")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise ShamirError(f"Shamir share of node {node_id} is not a field element")
        points.append((x_coordinate(node_id), y))
    base, extra = points[:t], points[t:]
    for x, y in extra:
        if _lagrange_at(base, x) != y:
            raise ShamirError("Shamir shares are inconsistent (one is corrupted or from another secret)")
    value = _lagrange_at(base, 0)
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    secret = _decode(raw)
    if secret is None:
        raise ShamirError("Shamir shares do not reconstruct a valid secret (too few, wrong or corrupted shares)")
    return secret
