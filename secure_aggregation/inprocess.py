"""The whole protocol in one process: the reference message flow (used by tests and the benchmark).

Each protocol step builds a fresh ``SecAggNode`` from its state file, exactly as a ClientApp
process that starts anew for every message would. Dropouts are simulated by skipping a node's
step: ``after_advertise`` nodes never send shares, ``silent`` nodes send no masked input in a
round, ``mute`` nodes mask but never answer the unmask request.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secure_aggregation.keys import RunId
from secure_aggregation.node_half import SecAggNode
from secure_aggregation.server_half import SecAggServer


def state_path(state_dir: Path, run_id: RunId, node_id: int) -> Path:
    """Where a node keeps its state for a run (one file per run and node)."""
    return Path(state_dir) / f"node-{node_id}" / f"secagg-{run_id}.json"


def setup(
    state_dir: Path,
    run_id: RunId,
    threshold: int,
    node_ids: Sequence[int],
    vector_length: int,
    after_advertise: Collection[int] = (),
) -> SecAggServer:
    """Run the two setup exchanges; nodes in ``after_advertise`` vanish before sharing keys."""
    server = SecAggServer(run_id, threshold, node_ids, vector_length)
    for nid in node_ids:
        pks = SecAggNode(state_path(state_dir, run_id, nid)).advertise(run_id, nid, threshold, list(node_ids))
        server.add_public_keys(nid, pks)
    broadcast = server.public_keys()
    for nid in broadcast:
        if nid not in after_advertise:
            cts = SecAggNode(state_path(state_dir, run_id, nid)).share_keys(broadcast, threshold)
            server.add_setup_shares(nid, cts)
    return server


def mask_step(
    server: SecAggServer, state_dir: Path, round_: int, inputs: Mapping[int, np.ndarray], silent: Collection[int] = ()
) -> dict[int, dict[str, Any]]:
    """Start the round and deliver every active, non-silent node's masked reply; returns the requests."""
    requests = server.start_round(round_)
    for nid, req in requests.items():
        if nid in silent:
            continue
        path = state_path(state_dir, server.run_id, nid)
        SecAggNode(path).receive_keys(round_, req["s_public_keys"], req["s_share_ciphertexts"])
        server.add_masked(nid, SecAggNode(path).mask(round_, inputs[nid]))
    return requests


def unmask_step(server: SecAggServer, state_dir: Path, round_: int, mute: Collection[int] = ()) -> dict[int, Any]:
    """Ask every survivor to unmask; ``mute`` survivors do not answer. Returns the replies."""
    replies: dict[int, Any] = {}
    for nid, req in server.unmask_requests().items():
        if nid in mute:
            continue
        node = SecAggNode(state_path(state_dir, server.run_id, nid))
        replies[nid] = node.unmask(round_, req["survivors"], req["dropped"], req["b_share_ciphertexts"])
    return replies


def run_round(
    server: SecAggServer,
    state_dir: Path,
    round_: int,
    inputs: Mapping[int, np.ndarray],
    silent: Collection[int] = (),
    mute: Collection[int] = (),
) -> np.ndarray:
    """One full round; returns the modular sum of the survivors' inputs."""
    mask_step(server, state_dir, round_, inputs, silent)
    return server.finish(unmask_step(server, state_dir, round_, mute))
