"""Secure aggregation's key agreement for a whole federation in one process, for the benchmarks.

Each node is a fresh ``SecAggNode`` built from its state file, as a ClientApp process that
starts anew for every message would be; the benchmarks then time the rounds step by step
themselves. A minimal copy of the setup in ``tests/support/secagg_inprocess.py`` (benchmarks do
not import the tests, and this is not product code: the real flow is ``server/secure_rounds.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from secure_aggregation.identity import Consortium
from secure_aggregation.keys import RunId
from secure_aggregation.node_half import SecAggNode
from secure_aggregation.server_half import SecAggServer


class Federation:
    """Nodes (with one shared simulated consortium) and the server of one in-process run."""

    def __init__(self, state_dir: Path, run_id: RunId, consortium: Consortium, server: SecAggServer) -> None:
        self.state_dir, self.run_id, self.consortium, self.server = Path(state_dir), run_id, consortium, server

    def node(self, nid: int) -> SecAggNode:
        """Node ``nid`` as a fresh process would see it: rebuilt from its state file."""
        return SecAggNode(Path(self.state_dir) / f"node-{nid}" / f"secagg-{self.run_id}.json", self.consortium)


def setup(
    state_dir: Path,
    run_id: RunId,
    threshold: int,
    neighbours: int,
    node_ids: Sequence[int],
    vector_length: int,
    consortium: Consortium,
) -> Federation:
    """Run the two setup exchanges (advertise keys, share keys) for every node."""
    fed = Federation(
        state_dir, run_id, consortium, SecAggServer(run_id, threshold, neighbours, node_ids, vector_length)
    )
    for nid in node_ids:
        ad = fed.node(nid).advertise(run_id, nid, f"hospital-{nid}", threshold, neighbours, list(node_ids))
        fed.server.add_advertisement(nid, ad)
    ads = fed.server.advertisements()
    for nid in ads:
        fed.server.add_setup(nid, fed.node(nid).share_keys(ads))
    return fed
