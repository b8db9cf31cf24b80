"""Fixed-point encoding for secure aggregation: round trip within the stated bound, loud range errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_aggregation import ClipRangeError, Quantizer, SecAggError


def _modsum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        np.add(total, v, out=total)
    return total


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_nodes=st.integers(1, 8),
    length=st.integers(1, 40),
    bits=st.sampled_from([4, 8, 16, 24, 32]),
    clip=st.sampled_from([1e-3, 0.5, 1.0, 37.0]),
)
def test_weighted_mean_round_trip_within_bound(seed: int, n_nodes: int, length: int, bits: int, clip: float) -> None:
    rng = np.random.default_rng(seed)
    q = Quantizer(clip, bits=bits)
    deltas = [rng.uniform(-clip, clip, length) for _ in range(n_nodes)]
    deltas[0][0] = clip  # the range ends are representable
    deltas[-1][-1] = -clip
    weights = [int(w) for w in rng.integers(1, 2**20 + 1, n_nodes)]
    total = _modsum([q.encode(d, w) for d, w in zip(deltas, weights)])
    mean, total_weight = q.decode_mean(total, n_nodes)
    true = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    assert total_weight == sum(weights)
    assert np.max(np.abs(mean - true)) <= q.error_bound + 1e-12 * clip


@pytest.mark.parametrize("weight", [1, 3, 2**12])
@pytest.mark.parametrize("bits", [32, 44])  # 44 bits with weight 2**12: the exact integer product path
def test_vectors_longer_than_one_chunk_encode_and_decode_like_one_value_at_a_time(weight: int, bits: int) -> None:
    """Encode and decode work chunk by chunk: every value, at and across chunk boundaries, must come out
    as the element-wise formula gives it."""
    from secure_aggregation import quantization

    q = Quantizer(0.5, bits=bits, max_weight=2**12)
    length = 2 * quantization._CHUNK + 17
    x = np.random.default_rng(7).uniform(-0.5, 0.5, length)
    x[[0, quantization._CHUNK - 1, quantization._CHUNK, length - 1]] = [0.5, -0.5, 0.25, -0.25]
    enc = q.encode(x, weight)
    levels = 2**bits - 1
    expected = [int(np.rint((v + 0.5) * levels)) * weight for v in x]
    assert enc[:-1].tolist() == expected and int(enc[-1]) == weight
    other = q.encode(-x, 1)
    mean, total_weight = q.decode_mean(_modsum([enc, other]), 2)
    assert total_weight == weight + 1
    assert np.max(np.abs(mean - (weight * x - x) / (weight + 1))) <= q.error_bound + 1e-12


def test_encoding_layout_weight_last_and_scaled() -> None:
    q = Quantizer(1.0, bits=8)
    enc = q.encode(np.array([-1.0, 0.0, 1.0]), weight=3)
    assert enc.dtype == np.uint64
    assert enc.tolist() == [0, 3 * 128, 3 * 255, 3]  # round(0.5 * 255) = 128 (half to even: 127.5 -> 128)
    assert q.error_bound == pytest.approx(1.0 / 255)


@pytest.mark.parametrize("values", [[0.0, 1.5, -2.0], [0.1, np.nan, np.inf, 3.0], [np.nan], [0.3, 1.123456]])
def test_out_of_range_values_raise_without_any_value_or_count_from_the_update(values: list[float]) -> None:
    q = Quantizer(1.0)
    with pytest.raises(ClipRangeError) as exc:
        q.encode(np.array(values), weight=1)
    msg = str(exc.value)
    assert "secagg-clip-range" in msg and "[-1, 1]" in msg
    assert not any(ch.isdigit() for ch in msg.replace("[-1, 1]", "").replace("2**64", ""))


@pytest.mark.parametrize("weight", [0, -1, 2**20 + 1, True, 1.5])
def test_weights_must_be_ints_in_range(weight: object) -> None:
    with pytest.raises(SecAggError):
        Quantizer(1.0).encode(np.zeros(2), weight=weight)  # type: ignore[arg-type]


def test_capacity_is_checked() -> None:
    q = Quantizer(1.0, bits=32, max_weight=2**20)
    assert q.max_nodes() == 4096  # (2**64 - 1) // (2**20 * (2**32 - 1))
    q.check_capacity(4096)
    with pytest.raises(SecAggError, match="could overflow 2\\*\\*64"):
        q.check_capacity(4097)
    with pytest.raises(SecAggError, match="overflow"):
        Quantizer(1.0, bits=48, max_weight=2**20).decode_mean(np.zeros(3, dtype=np.uint64), 2**16)


def test_decode_rejects_impossible_total_weight() -> None:
    q = Quantizer(1.0)
    total = _modsum([q.encode(np.zeros(2), 1), q.encode(np.zeros(2), 1)])
    with pytest.raises(SecAggError, match="total weight 2 is impossible for 3 nodes"):
        q.decode_mean(total, 3)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_clip_is_rejected(clip: float) -> None:
    with pytest.raises(SecAggError, match="secagg-clip-range"):
        Quantizer(clip)
