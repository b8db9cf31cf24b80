"""The hospital's half of secure aggregation, over Flower messages.

Wraps ``secure_aggregation.SecAggNode``, whose state (this run's private keys, received shares,
what was revealed) lives in the hospital's private state folder next to its privacy ledger, so a
fresh ClientApp process per message continues where the last one stopped. The trained update
leaves the hospital only as a masked, quantised, weight-scaled delta from the global model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedcare import protocol
from secure_aggregation import Quantizer, SecAggNode
from secure_aggregation.records import flatten, pack_vector, unflatten


def state_file(state_dir: str | Path, run_id: int, node_id: int) -> Path:
    """One file per run and node (in-process simulations share a folder between virtual nodes)."""
    return Path(state_dir) / "secagg" / f"node-{node_id}" / f"secagg-run-{run_id}.json"


def payload(content: RecordDict) -> dict:
    """The server's request, from the ``secagg/`` keys of the message's config record."""
    return unflatten(dict(content[protocol.CONFIG]), protocol.SECAGG)


def advertise(path: Path, run_id: int, node_id: int, request: dict) -> dict[str, Any]:
    keys = SecAggNode(path).advertise(run_id, node_id, int(request["threshold"]),
                                      [int(n) for n in request["nodes"]])
    return flatten(keys, protocol.SECAGG)


def share_keys(path: Path, request: dict) -> dict[str, Any]:
    shares = SecAggNode(path).share_keys(request["keys"], int(request["threshold"]))
    return flatten({"shares": shares}, protocol.SECAGG)


def masked_update(path: Path, request: dict, global_arrays: ArrayRecord, trained: ArrayRecord,
                  weight: int, clip: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Quantise weight x (trained - global), mask it for this round: the masked vector, and the
    reply's ``secagg/`` keys (the masked vector packed among them).

    Raises ``ClipRangeError`` (nothing released) when the update leaves the agreed clip range.
    """
    delta = np.empty(sum(int(np.prod(a.shape)) for a in global_arrays.values()), dtype=np.float64)
    start = 0
    for name in global_arrays.keys():
        before = global_arrays[name].numpy()
        part = delta[start:start + before.size].reshape(before.shape)
        np.subtract(trained[name].numpy(), before, out=part, dtype=np.float64)
        start += before.size
    encoded = Quantizer(clip).encode(delta, weight)
    rnd = int(request["round"])
    node = SecAggNode(path)
    node.receive_keys(rnd, request["s_public_keys"], request["s_share_ciphertexts"])
    reply = node.mask(rnd, encoded)
    masked = reply.pop("masked")
    return masked, flatten(reply | {"masked": pack_vector(masked)}, protocol.SECAGG)


def unmask(path: Path, request: dict, last_round: bool) -> dict[str, Any]:
    """Reveal this round's shares; after the run's last round the private state is deleted."""
    revealed = SecAggNode(path).unmask(int(request["round"]), [int(n) for n in request["survivors"]],
                                       [int(n) for n in request.get("dropped", [])],
                                       request.get("b_share_ciphertexts", {}))
    if last_round:
        path.unlink(missing_ok=True)
    return flatten(revealed, protocol.SECAGG)
