"""Input checks shared by the node and server halves (node ids, thresholds, share bundles).

Why here: both halves must agree exactly on what a valid node id and a valid threshold are,
and messages arrive from a transport (Flower ConfigRecords have string keys), so ids are
normalised to ints in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from secure_aggregation.errors import SecAggError
from secure_aggregation.shamir import MAX_NODE_ID


def node_id(value: object) -> int:
    """A node id as int: accepts ints and decimal strings (transport dict keys) in [0, 2**64)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NODE_ID:
        raise SecAggError(f"node id {value!r} is not an int in [0, 2**64)")
    return value


def node_ids(values: Iterable[object], what: str) -> list[int]:
    """Sorted distinct node ids; raises on duplicates."""
    ids = [node_id(v) for v in values]
    if len(set(ids)) != len(ids):
        raise SecAggError(f"{what} lists a node id more than once")
    return sorted(ids)


def by_node(mapping: Mapping[Any, Any], what: str) -> dict[int, Any]:
    """Re-key a transport dict by int node id."""
    if not isinstance(mapping, Mapping):
        raise SecAggError(f"{what} must be a dict keyed by node id")
    out: dict[int, Any] = {}
    for key, value in mapping.items():
        nid = node_id(key)
        if nid in out:
            raise SecAggError(f"{what} has node {nid} twice")
        out[nid] = value
    return out


def check_threshold(threshold: object, n_nodes: int) -> int:
    """Threshold t must satisfy 2 <= t <= n and t > n / 2.

    Why the majority: with t > n/2 no two disjoint groups of nodes can each hand over t shares,
    so even a server that lies to different nodes cannot collect both a node's self-mask seed
    and its pairwise mask key in the same round.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise SecAggError(f"secagg threshold must be an int, got {threshold!r}")
    if n_nodes < 2:
        raise SecAggError(
            f"secure aggregation needs at least 2 nodes, got {n_nodes}",
            "run with more hospitals or turn secure aggregation off",
        )
    if not (n_nodes // 2 + 1 <= threshold <= n_nodes and threshold >= 2):
        raise SecAggError(
            f"secagg threshold {threshold} is invalid for {n_nodes} nodes",
            f"use a majority threshold between {max(2, n_nodes // 2 + 1)} and {n_nodes}",
        )
    return threshold


def ciphertext(value: object, what: str) -> bytes:
    """A ciphertext must be bytes."""
    if not isinstance(value, (bytes, bytearray)):
        raise SecAggError(f"{what} must be bytes, got {type(value).__name__}")
    return bytes(value)
