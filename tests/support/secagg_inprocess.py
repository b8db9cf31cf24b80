"""The whole secure-aggregation protocol in one process: the reference message flow the tests drive.

Each protocol step builds a fresh ``SecAggNode`` from its state file, exactly as a ClientApp
process that starts anew for every message would. Dropouts are simulated by skipping a node's
step: ``after_advertise`` nodes never send shares, ``silent`` nodes send no masked input in a
round, ``mute`` nodes mask but never answer the unmask exchange(s).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secure_aggregation.identity import Consortium
from secure_aggregation.keys import RunId
from secure_aggregation.node_half import SecAggNode
from secure_aggregation.server_half import RoundOutcome, SecAggServer


def state_path(state_dir: Path, run_id: RunId, node_id: int) -> Path:
    """Where a node keeps its state for a run (one file per run and node)."""
    return Path(state_dir) / f"node-{node_id}" / f"secagg-{run_id}.json"


def name_of(node_id: int) -> str:
    """The consortium name of a node in these in-process runs."""
    return f"hospital-{node_id}"


class Federation:
    """Nodes (with one shared simulated consortium) and the server of one in-process run."""

    def __init__(self, state_dir: Path, run_id: RunId, consortium: Consortium, server: SecAggServer) -> None:
        self.state_dir, self.run_id, self.consortium, self.server = Path(state_dir), run_id, consortium, server

    def node(self, nid: int) -> SecAggNode:
        return SecAggNode(state_path(self.state_dir, self.run_id, nid), self.consortium)


def setup(
    state_dir: Path,
    run_id: RunId,
    threshold: int,
    neighbours: int,
    node_ids: Sequence[int],
    vector_length: int,
    consortium: Consortium,
    after_advertise: Collection[int] = (),
) -> Federation:
    """Run the two setup exchanges; nodes in ``after_advertise`` vanish before sharing keys."""
    fed = Federation(
        state_dir, run_id, consortium, SecAggServer(run_id, threshold, neighbours, node_ids, vector_length)
    )
    for nid in node_ids:
        ad = fed.node(nid).advertise(run_id, nid, name_of(nid), threshold, neighbours, list(node_ids))
        fed.server.add_advertisement(nid, ad)
    ads = fed.server.advertisements()
    for nid in ads:
        if nid not in after_advertise:
            fed.server.add_setup(nid, fed.node(nid).share_keys(ads))
    return fed


def mask_step(
    fed: Federation, round_: int, inputs: Mapping[int, np.ndarray], silent: Collection[int] = ()
) -> dict[int, dict[str, Any]]:
    """Start the round and deliver every active, non-silent node's masked reply; returns the requests."""
    requests = fed.server.start_round(round_)
    for nid, req in requests.items():
        if nid in silent:
            continue
        node = fed.node(nid)
        node.receive_keys(round_, req["peers"])
        fed.server.add_masked(nid, fed.node(nid).mask(round_, inputs[nid]))
    return requests


def unmask_step(fed: Federation, round_: int, mute: Collection[int] = ()) -> dict[int, Any]:
    """The fast path when nobody dropped, else the consistency path; ``mute`` nodes never answer."""
    server = fed.server
    replies: dict[int, Any] = {}
    if server.fast_path():
        for nid, req in server.unmask_fast_requests().items():
            if nid not in mute:
                replies[nid] = fed.node(nid).unmask_fast(round_, req["b_share_ciphertexts"], req["statements"])
        return replies
    for nid, req in server.view_requests().items():
        if nid not in mute:
            server.add_view_signature(nid, fed.node(nid).sign_view(round_, req["survivors"]))
    for nid, req in server.unmask_requests().items():
        replies[nid] = fed.node(nid).unmask(
            round_, req["survivors"], req["signatures"], req["b_share_ciphertexts"], req["statements"]
        )
    return replies


def run_round(
    fed: Federation,
    round_: int,
    inputs: Mapping[int, np.ndarray],
    silent: Collection[int] = (),
    mute: Collection[int] = (),
) -> tuple[np.ndarray, RoundOutcome]:
    """One full round; returns the modular sum of the survivors' inputs and what finish found."""
    mask_step(fed, round_, inputs, silent)
    return fed.server.finish(unmask_step(fed, round_, mute))
