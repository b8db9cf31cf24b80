"""Fixed-point encoding of model updates into Z_(2**64), so masked vectors can be summed.

Why: pairwise masks only cancel in modular integer arithmetic, so each node turns its float
update into integers first. Each value x in [-clip, clip] becomes

    q(x) = round((x + clip) / (2 clip) * (2**bits - 1))        in [0, 2**bits - 1]

and a node sends ``weight * q(delta)`` with ``weight`` itself appended as the LAST element. The
modular sum over nodes then carries sum_i w_i q_i and the total weight W = sum_i w_i, which
gives the weighted mean without any node's weight being revealed on its own.

Error bound (tested): each q_i is within half a step of the exact value, and a weighted mean
of values that are each within half a step is too, so

    |decode_mean(...) - true weighted mean| <= clip / (2**bits - 1)   per element (+ float eps).

Capacity: the sum must not wrap, i.e. n_nodes * max_weight * (2**bits - 1) < 2**64. With the
defaults (bits=32, max_weight=2**20) that allows up to 4095 nodes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from secure_aggregation.errors import ClipRangeError, SecAggError

MODULUS_BITS = 64
_MAX_BITS = 48  # float64 computes q exactly enough (step << 1) up to here
_CHUNK = 1 << 16  # values per step of encode/decode


class Quantizer:
    """Encode float updates as weighted fixed-point uint64 vectors and decode their sum."""

    def __init__(self, clip: float, bits: int = 32, max_weight: int = 2**20) -> None:
        if not (isinstance(clip, (int, float)) and np.isfinite(clip) and clip > 0):
            raise SecAggError(
                f"secagg clip range must be a positive finite number, got {clip!r}",
                "set secagg-clip-range to the largest |update value| expected, e.g. 1.0 "
                "(`fedcare simulate --secagg-clip-range`, or run-config secagg-clip-range)",
            )
        if not (isinstance(bits, int) and 1 <= bits <= _MAX_BITS):
            raise SecAggError(f"secagg quantization bits must be an int in 1..{_MAX_BITS}, got {bits!r}")
        if not (isinstance(max_weight, int) and max_weight >= 1):
            raise SecAggError(f"secagg max_weight must be an int >= 1, got {max_weight!r}")
        self.clip = float(clip)
        self.bits = bits
        self.max_weight = max_weight
        self.levels = 2**bits - 1

    @property
    def error_bound(self) -> float:
        """Largest |decoded mean - true weighted mean| per element (before float rounding)."""
        return self.clip / self.levels

    def max_nodes(self) -> int:
        """How many nodes can be summed without the modular sum wrapping around."""
        return (2**MODULUS_BITS - 1) // (self.max_weight * self.levels)

    def check_capacity(self, n_nodes: int) -> None:
        """Raise unless n_nodes * max_weight * (2**bits - 1) < 2**64 (the sum cannot wrap)."""
        if n_nodes < 1 or n_nodes * self.max_weight * self.levels >= 2**MODULUS_BITS:
            raise SecAggError(
                f"secure aggregation of {n_nodes} nodes with weights up to {self.max_weight} at "
                f"{self.bits} bits could overflow 2**64 (at most {self.max_nodes()} nodes fit)",
                "lower the quantization bits or the maximum weight, or aggregate fewer nodes",
            )

    def encode(self, delta: np.ndarray, weight: int) -> np.ndarray:
        """Return ``weight * q(delta)`` (flattened, uint64) with ``weight`` appended last.

        Raises ClipRangeError, never wraps silently, when a value is outside [-clip, clip] or
        not finite.
        """
        x = np.asarray(delta, dtype=np.float64).ravel()
        return self.encode_parts((x[i : i + _CHUNK] for i in range(0, x.size, _CHUNK)), x.size, weight)

    def encode_parts(self, parts: Iterable[np.ndarray], length: int, weight: int) -> np.ndarray:
        """``encode`` of the concatenation of ``parts`` (1-D float arrays, ``length`` values in all),
        without ever holding it: a caller can compute a long update piece by piece into one small
        buffer. A part may be overwritten. Raises ClipRangeError at the first part out of range."""
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
            raise SecAggError(f"secagg weight must be an int, got {type(weight).__name__}")
        weight = int(weight)
        if not 1 <= weight <= self.max_weight:
            raise SecAggError(
                f"secagg weight {weight} is outside 1..{self.max_weight}",
                "weights are public integer sizes (e.g. training examples) >= 1; raise max_weight if needed",
            )
        out = np.empty(length + 1, dtype=np.uint64)
        exact = weight * self.levels < 2**53  # the float product is an exact integer (the default: 2**52)
        scale = self.levels / (2.0 * self.clip)
        # Piece by piece through one small float buffer: no full-length temporaries, whose page
        # faults cost more than the arithmetic at millions of values.
        scratch = np.empty(min(_CHUNK, length), dtype=np.float64)
        start = 0
        for part in parts:
            n = part.size
            if start + n > length:
                raise SecAggError(f"secagg encode was promised {length} values and given more")
            # min/max are NaN when any value is; refused before anything is written
            if n and not (-self.clip <= float(part.min()) and float(part.max()) <= self.clip):
                self._raise_out_of_range(part)
            for offset in range(0, n, _CHUNK):
                piece = part[offset : offset + _CHUNK]
                t = scratch[: piece.size]
                np.add(piece, self.clip, out=t)
                t *= scale
                np.rint(t, out=t)
                np.clip(t, 0, self.levels, out=t)
                target = out[start + offset : start + offset + piece.size]
                if exact:
                    t *= weight
                    target[:] = t
                else:
                    np.multiply(t.astype(np.uint64), np.uint64(weight), out=target)
            start += n
        if start != length:
            raise SecAggError(f"secagg encode was promised {length} values and given {start}")
        out[-1] = weight
        return out

    def _raise_out_of_range(self, x: np.ndarray) -> None:
        # No count and no value from the update: this message may travel, and it must carry nothing.
        raise ClipRangeError(
            f"update values lie outside [-{self.clip:g}, {self.clip:g}] or are not finite; secure "
            "aggregation would wrap them",
            "clip the update into secagg-clip-range before encoding (the node does: client/secure_update.py)",
        )

    def decode_mean(self, total: np.ndarray, n_nodes: int) -> tuple[np.ndarray, int]:
        """Turn the modular sum of ``n_nodes`` encodings into (weighted mean float64, total weight)."""
        self.check_capacity(n_nodes)
        total = np.asarray(total)
        if total.dtype != np.uint64 or total.ndim != 1 or total.size < 2:
            raise SecAggError("secagg decode expects a 1-D uint64 sum with the total weight last")
        w = int(total[-1])
        if not n_nodes <= w <= n_nodes * self.max_weight:
            raise SecAggError(
                f"secagg total weight {w} is impossible for {n_nodes} nodes with weights in 1..{self.max_weight}",
                "the sum is corrupt or n_nodes is wrong (pass the number of survivors)",
            )
        body = total[:-1]
        # sum_i w_i q_i / W in float64: the sum's conversion and the division each round to within
        # 2**-53 of the value, at most 2**bits, so the result is within 2**(bits-52) of a step of the
        # exact mean, far inside the half-step bound (the integer division this replaced was ~4x slower).
        mean = np.empty(body.size, dtype=np.float64)
        for start in range(0, body.size, _CHUNK):
            m = mean[start : start + _CHUNK]
            np.divide(body[start : start + _CHUNK], float(w), out=m)
            m *= 2.0 * self.clip / self.levels
            m -= self.clip
        return mean, w
