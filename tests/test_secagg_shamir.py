"""Shamir t-of-n sharing: any t shares recover the secret, fewer do not, corruption is caught."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_aggregation import ShamirError, shamir


@st.composite
def sharing(draw: st.DrawFn) -> tuple[bytes, int, list[int], int]:
    n = draw(st.integers(1, 9))
    t = draw(st.integers(1, n))
    ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    secret = draw(st.binary(min_size=0, max_size=shamir.MAX_SECRET_BYTES))
    seed = draw(st.integers(0, 2**32 - 1))
    return secret, t, ids, seed


@settings(max_examples=80, deadline=None)
@given(sharing())
def test_any_t_shares_recover_the_secret(case: tuple[bytes, int, list[int], int]) -> None:
    secret, t, ids, seed = case
    shares = shamir.split(secret, t, ids)
    assert set(shares) == set(ids)
    rng = random.Random(seed)
    for k in (t, len(ids)):
        subset = rng.sample(ids, k)
        assert shamir.combine({i: shares[i] for i in subset}, t) == secret


@settings(max_examples=80, deadline=None)
@given(sharing())
def test_fewer_than_t_shares_fail_or_are_wrong(case: tuple[bytes, int, list[int], int]) -> None:
    secret, t, ids, seed = case
    if t < 2:
        return
    shares = shamir.split(secret, t, ids)
    subset = random.Random(seed).sample(ids, t - 1)
    few = {i: shares[i] for i in subset}
    with pytest.raises(ShamirError, match="are needed"):
        shamir.combine(few, t)
    # Pretending the threshold is lower yields no (valid) secret.
    if t - 1 >= 1:
        with contextlib.suppress(ShamirError):
            assert shamir.combine(few, t - 1) != secret


def test_thirty_two_byte_secrets_with_leading_zeros_survive() -> None:
    secret = bytes(31) + b"\x07"
    shares = shamir.split(secret, 3, [0, 5, 2**64 - 1, 9])
    assert shamir.combine({k: shares[k] for k in (0, 9, 2**64 - 1)}, 3) == secret
    assert len(shares[5]) == shamir.SHARE_BYTES


def test_a_corrupted_share_is_detected() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    bad = dict(shares)
    bad[2] = bytes([bad[2][0] ^ 0]) + bad[2][1:-1] + bytes([bad[2][-1] ^ 1])
    with pytest.raises(ShamirError, match="inconsistent"):
        shamir.combine(bad, 3)  # extra shares disagree with the first three
    with pytest.raises(ShamirError, match="do not reconstruct"):
        shamir.combine({k: bad[k] for k in (1, 2, 3)}, 3)  # exactly t, one corrupted


@pytest.mark.parametrize(
    ("ids", "t", "secret"),
    [([1, 1, 2], 2, b"x"), ([1, 2], 3, b"x"), ([1, 2], 0, b"x"), ([-1, 2], 2, b"x"), ([1, 2], 2, bytes(41))],
)
def test_split_rejects_bad_arguments(ids: list[int], t: int, secret: bytes) -> None:
    with pytest.raises(ShamirError):
        shamir.split(secret, t, ids)


def test_combine_rejects_malformed_shares() -> None:
    with pytest.raises(ShamirError, match="malformed"):
        shamir.combine({1: b"short", 2: b"x" * shamir.SHARE_BYTES}, 2)
    with pytest.raises(ShamirError, match="not a field element"):
        shamir.combine({1: b"\xff" * shamir.SHARE_BYTES, 2: b"\x00" * shamir.SHARE_BYTES}, 2)
