"""Masks: the PRG, key derivation and AAD binding, pairwise cancellation, and that a masked
vector looks uniform and cannot be unmasked without t shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_aggregation import ShamirError, TamperingDetected, TooFewSurvivors, keys, masking, shamir
from secure_aggregation.identity import SimulatedConsortium
from secure_aggregation.prg import mask_vector
from tests.support import secagg_inprocess as ip

# ---- PRG --------------------------------------------------------------------------------------


def test_prg_is_deterministic_per_seed_and_uint64() -> None:
    a = mask_vector(b"\x01" * 32, 1000)
    assert a.dtype == np.uint64 and a.shape == (1000,) and a.flags.writeable
    assert np.array_equal(a, mask_vector(b"\x01" * 32, 1000))
    assert np.array_equal(a[:10], mask_vector(b"\x01" * 32, 10))  # a prefix of the same stream
    assert not np.array_equal(a, mask_vector(b"\x02" + b"\x01" * 31, 1000))
    assert not np.array_equal(a, mask_vector(b"\x01" * 31 + b"\x02", 1000))  # the counter half counts too
    assert mask_vector(b"\x01" * 32, 0).shape == (0,)


def test_prg_rejects_bad_seeds() -> None:
    with pytest.raises(Exception, match="32 bytes"):
        mask_vector(b"short", 10)


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(0, 40),
    chunk=st.integers(1, 9),
    signs=st.lists(st.sampled_from([1, -1]), min_size=0, max_size=5),
    start=st.lists(st.integers(0, 2**64 - 1), min_size=40, max_size=40),
)
def test_adding_masks_chunk_by_chunk_equals_adding_whole_mask_vectors(
    length: int, chunk: int, signs: list[int], start: list[int]
) -> None:
    from secure_aggregation import prg

    seeds = [bytes([i + 1]) * 32 for i in range(len(signs))]
    expected = np.array(start[:length], dtype=np.uint64)
    for seed, sign in zip(seeds, signs):
        masking_op = np.add if sign > 0 else np.subtract
        masking_op(expected, mask_vector(seed, length), out=expected)
    acc = np.array(start[:length], dtype=np.uint64)
    original = prg._CHUNK_WORDS
    prg._CHUNK_WORDS = chunk  # chunk boundaries inside, at and past the vector's end
    try:
        prg.add_masks(acc, zip(seeds, signs))
    finally:
        prg._CHUNK_WORDS = original
    assert np.array_equal(acc, expected)


def test_adding_masks_refuses_what_it_cannot_add_to() -> None:
    from secure_aggregation import SecAggError, prg

    with pytest.raises(SecAggError, match="sign"):
        prg.add_masks(np.zeros(4, dtype=np.uint64), [(b"\x01" * 32, 2)])
    with pytest.raises(SecAggError, match="uint64"):
        prg.add_masks(np.zeros(4, dtype=np.int64), [(b"\x01" * 32, 1)])
    with pytest.raises(SecAggError, match="32 bytes"):
        prg.add_masks(np.zeros(4, dtype=np.uint64), [(b"short", 1)])


# ---- keys: derivation and authenticated encryption ---------------------------------------------


def test_agreement_and_seed_derivation_are_symmetric_and_domain_separated() -> None:
    a_sk, a_pk = keys.generate_keypair()
    b_sk, b_pk = keys.generate_keypair()
    shared = keys.agree(a_sk, b_pk)
    assert shared == keys.agree(b_sk, a_pk)
    seed = keys.mask_seed(shared, 7, 3, 10, 20)
    assert seed == keys.mask_seed(shared, 7, 3, 20, 10)
    others = {
        keys.mask_seed(shared, 8, 3, 10, 20),
        keys.mask_seed(shared, 7, 4, 10, 20),
        keys.mask_seed(shared, 7, 3, 10, 21),
        keys.encryption_key(shared, 7, 10, 20),
    }
    assert seed not in others and len(others) == 4


def test_low_order_public_key_is_reported_by_node() -> None:
    sk, _ = keys.generate_keypair()
    with pytest.raises(TamperingDetected, match="node 9"):
        keys.agree(sk, bytes(32), peer=9)


def test_aad_binds_every_field_and_ciphertext_integrity() -> None:
    key = keys.encryption_key(b"k" * 32, 1, 2, 3)
    blob = keys.seal(key, b"share", keys.aad(1, 3, "b-share", 2, 3))
    assert keys.open_sealed(key, blob, keys.aad(1, 3, "b-share", 2, 3)) == b"share"
    for wrong in [
        keys.aad(2, 3, "b-share", 2, 3),  # other run
        keys.aad(1, 4, "b-share", 2, 3),  # replay into another round
        keys.aad(1, 3, "s-share", 2, 3),  # other stage
        keys.aad(1, 3, "b-share", 3, 2),  # reflected direction
        keys.aad(1, 3, "b-share", 5, 3),  # other sender
    ]:
        with pytest.raises(InvalidTag):
            keys.open_sealed(key, blob, wrong)
    corrupted = blob[:20] + bytes([blob[20] ^ 0x40]) + blob[21:]
    with pytest.raises(TamperingDetected, match="b-share from node 2 for round 3 failed authentication"):
        keys.open_share(key, corrupted, 1, 3, "b-share", 2, 3)
    assert blob != keys.seal(key, b"share", keys.aad(1, 3, "b-share", 2, 3))  # random nonces


# ---- pairwise masks cancel --------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=8, unique=True),
    round_=st.integers(1, 10_000),
    run_id=st.one_of(st.integers(0, 2**63), st.text(max_size=8)),
    length=st.integers(1, 64),
)
def test_pairwise_masks_cancel_in_the_sum_for_any_node_set(
    ids: list[int], round_: int, run_id: int | str, length: int
) -> None:
    pairs = {i: keys.generate_keypair() for i in ids}
    publics = {i: pk for i, (_, pk) in pairs.items()}
    total = np.zeros(length, dtype=np.uint64)
    for i, (sk, _) in pairs.items():
        acc = np.zeros(length, dtype=np.uint64)
        masking.add_pairwise_masks(acc, run_id, round_, i, sk, publics)
        assert np.any(acc != 0)  # each node's mask alone is not zero
        np.add(total, acc, out=total)
    assert not np.any(total)


# ---- a masked vector looks uniform ------------------------------------------------------------


def _bit_balance_ok(values: np.ndarray) -> bool:
    n = values.size
    bits = ((values[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).sum(axis=0)
    return bool(np.all(np.abs(bits - n / 2) <= 6 * np.sqrt(n / 4)))  # 6 sigma per bit


def _top_byte_chi_square(values: np.ndarray) -> float:
    counts = np.bincount((values >> np.uint64(56)).astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _fed(tmp_path: Path, run: str, ids: list[int], t: int, length: int) -> ip.Federation:
    return ip.setup(tmp_path, run, t, len(ids) - 1, ids, length, SimulatedConsortium(b"\x07" * 32))


def test_one_masked_constant_vector_is_indistinguishable_from_uniform(tmp_path: Path) -> None:
    ids, length = [1, 2, 3], 60_000
    federation = _fed(tmp_path, "uniform", ids, 2, length)
    constant = np.full(length, 12345, dtype=np.uint64)
    requests = federation.server.start_round(1)
    federation.node(1).receive_keys(1, requests[1]["peers"])
    masked = federation.node(1).mask(1, constant)["masked"]
    assert _bit_balance_ok(masked)
    # chi-square, 255 degrees of freedom: mean 255, sd 22.6; 420 is beyond p = 1e-9
    assert _top_byte_chi_square(masked) < 420
    assert len(np.unique(masked)) > length - 5


def test_masks_of_the_same_constant_differ_every_round_and_look_uniform(tmp_path: Path) -> None:
    ids, length, rounds = [4, 5, 6], 64, 60
    federation = _fed(tmp_path, "rounds", ids, 2, length)
    constant = np.full(length, 7, dtype=np.uint64)
    seen = []
    for r in range(1, rounds + 1):
        for nid, req in federation.server.start_round(r).items():
            federation.node(nid).receive_keys(r, req["peers"])
            reply = federation.node(nid).mask(r, constant)
            federation.server.add_masked(nid, reply)
            if nid == 4:
                seen.append(reply["masked"])
        federation.server.abort_round()  # no unmask needed to look at the masked inputs
    stacked = np.concatenate(seen)
    assert len({int(v[0]) for v in seen}) == rounds
    assert _bit_balance_ok(stacked)
    assert _top_byte_chi_square(stacked) < 420


# ---- the server cannot unmask one input without t shares ---------------------------------------


def test_fewer_than_t_shares_do_not_unmask_an_input(tmp_path: Path) -> None:
    ids, t, length = [1, 2, 3, 4, 5], 3, 32
    federation = _fed(tmp_path, "few", ids, t, length)
    rng = np.random.default_rng(1)
    inputs = {i: rng.integers(0, 2**32, length, dtype=np.uint64) for i in ids}
    ip.mask_step(federation, 1, inputs)
    replies = ip.unmask_step(federation, 1, mute=[3, 4, 5])  # only 2 < t answer
    with pytest.raises(TooFewSurvivors, match="only 2 good shares"):
        federation.server.finish(replies)
    # The shares of node 1's self-mask seed that the server now holds cannot rebuild it.
    b_of_1 = {holder: reply["b"][1][: shamir.SHARE_BYTES] for holder, reply in replies.items()}
    with pytest.raises(ShamirError):
        shamir.combine(b_of_1, t)
    try:  # pretending the threshold were 2 gives no valid seed either
        shamir.combine(b_of_1, 2)
        raise AssertionError("two shares reconstructed a seed")
    except ShamirError:
        pass
    # One more reply (t in all) and the round completes: the failed attempt changed nothing.
    replies.update(ip.unmask_step(federation, 1, mute=[1, 2, 4, 5]))
    total, _ = federation.server.finish(replies)
    expected = np.zeros(length, dtype=np.uint64)
    for v in inputs.values():
        np.add(expected, v, out=expected)
    assert np.array_equal(total, expected)
