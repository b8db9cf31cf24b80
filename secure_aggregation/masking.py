"""Self masks and pairwise masks in Z_(2**64), shared by the node and the server halves.

Node u with round-r mask key s_u adds, for every other active node v,
+PRG(k_uv) if u < v and -PRG(k_uv) if u > v, where k_uv is derived from X25519(s_u, s_v) and
(run, round, {u, v}). Both ends of a pair derive the same k_uv with opposite signs, so the masks
cancel in the sum over all nodes. The server uses the same functions to remove the masks a
survivor shared with a dropped node, once it has reconstructed the dropped node's key.
numpy uint64 add/subtract wrap around, which is exactly arithmetic modulo 2**64.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from secure_aggregation import keys
from secure_aggregation.prg import add_masks


def pairwise_sign(me: int, peer: int) -> int:
    """+1 if ``me`` adds the pair's mask, -1 if it subtracts it (the smaller id adds)."""
    return 1 if me < peer else -1


def apply_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """In place: acc = acc + sign * PRG(seed)  (mod 2**64)."""
    add_masks(acc, [(seed, sign)])


def pairwise_seed(
    run_id: keys.RunId, round_: int, me: int, my_s_private: bytes, peer: int, peer_s_public: bytes
) -> bytes:
    """Mask seed k_(me,peer) for one round, from my private and the peer's public mask key."""
    shared = keys.agree(my_s_private, peer_s_public, peer=peer)
    return keys.mask_seed(shared, run_id, round_, me, peer)


def pairwise_masks(
    run_id: keys.RunId,
    round_: int,
    me: int,
    my_s_private: bytes,
    peer_s_publics: Mapping[int, bytes],
) -> list[tuple[bytes, int]]:
    """Node ``me``'s (seed, sign) for every peer in ``peer_s_publics``, for ``add_masks``."""
    return [
        (pairwise_seed(run_id, round_, me, my_s_private, peer, peer_pk), pairwise_sign(me, peer))
        for peer, peer_pk in peer_s_publics.items()
        if peer != me
    ]


def add_pairwise_masks(
    acc: np.ndarray,
    run_id: keys.RunId,
    round_: int,
    me: int,
    my_s_private: bytes,
    peer_s_publics: Mapping[int, bytes],
) -> None:
    """In place: add node ``me``'s signed pairwise masks with every peer in ``peer_s_publics``."""
    add_masks(acc, pairwise_masks(run_id, round_, me, my_s_private, peer_s_publics))
