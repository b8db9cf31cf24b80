"""The hospital's half of secure aggregation, over Flower messages.

Wraps ``secure_aggregation.SecAggNode``, whose state (this run's private keys, received shares, what
was revealed) lives in the hospital's private state folder next to its privacy ledger, so a fresh
ClientApp process per message continues where the last one stopped. The trained update leaves the
hospital only as a masked, quantised, weight-scaled delta from the global model.

Who the hospital accepts as peers is its consortium (``secure_aggregation.identity``): the roster
it pinned and its own identity key (hospital.toml ``[consortium]``), or, for a simulated hospital,
keys derived from a secret kept with the simulated hospitals' state.

Private key material is deleted when the run ends (the coordinator's end message), when the node
starts (no run survives a node restart: a resumed run agrees new keys), and when a run's state has
not been touched for ``ABANDONED_AFTER_S`` (checked at every secure-aggregation message).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from secure_aggregation import ClipRangeError, Quantizer, SecAggNode, messages
from secure_aggregation.identity import Consortium

ABANDONED_AFTER_S = 24 * 3600


def state_dir(ledger_dir: str | Path) -> Path:
    return Path(ledger_dir) / "secagg"


def state_file(ledger_dir: str | Path, run_id: int, node_id: int) -> Path:
    """One file per run and node (in-process simulations share a folder between virtual nodes)."""
    return state_dir(ledger_dir) / f"node-{node_id}" / f"secagg-run-{run_id}.json"


def forget_abandoned(ledger_dir: str | Path, keep: Path | None = None, older_than_s: float = ABANDONED_AFTER_S) -> int:
    """Delete secure-aggregation states (private keys) not touched for ``older_than_s``; returns how many."""
    removed = 0
    now = time.time()
    for path in state_dir(ledger_dir).glob("node-*/secagg-run-*.json"):
        if path != keep and now - path.stat().st_mtime > older_than_s:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def forget_all(ledger_dir: str | Path) -> int:
    """Delete every secure-aggregation state of this hospital (at node start: no run survives it)."""
    return forget_abandoned(ledger_dir, older_than_s=-1.0)


def advertise(
    path: Path,
    consortium: Consortium,
    run_id: int,
    node_id: int,
    name: str,
    request: messages.KeyAgreementRequest,
    floor: int,
) -> messages.AdvertiseReply:
    ad = SecAggNode(path, consortium).advertise(
        run_id, node_id, name, request.threshold, request.neighbours, request.nodes, floor=floor
    )
    return messages.AdvertiseReply(ad)


def share_keys(
    path: Path, consortium: Consortium, request: messages.ShareKeysRequest, min_nodes: int
) -> messages.ShareKeysReply:
    return messages.ShareKeysReply(SecAggNode(path, consortium).share_keys(request.ads, min_nodes=min_nodes))


def masked_update(
    path: Path,
    consortium: Consortium,
    request: messages.MaskRequest,
    global_arrays: ArrayRecord,
    trained: Mapping[str, np.ndarray],
    weight: int,
    clip: float,
) -> messages.MaskedUpdate:
    """Quantise weight x (trained - global) and mask it for this round: the masked vector with its
    signed round statement (which names the nodes it masked with).
    ``trained``: the trained parameters by name (views of the model are fine: only read here).

    Values outside the agreed range [-clip, clip] are clipped into it here, at the hospital, and a
    non-finite value (a diverged step) becomes 0: both are post-processing of the DP release, so
    nothing about the update has to be refused or explained to the server. How many values were
    clipped is logged on this node only.
    """
    before = {name: global_arrays[name].numpy().ravel() for name in global_arrays}
    length = sum(b.size for b in before.values())
    quantizer = Quantizer(clip)
    try:  # the common case: every value in range, encoded piece by piece (no full-length delta)
        encoded = quantizer.encode_parts(_delta_parts(before, trained), length, weight)
    except ClipRangeError:
        delta = np.concatenate([np.asarray(trained[name], dtype=np.float64).ravel() - b for name, b in before.items()])
        _clip_in_place(delta, clip)
        encoded = quantizer.encode(delta, weight)
    node = SecAggNode(path, consortium)
    node.receive_keys(request.round, request.peers)
    statement = node.mask(request.round, encoded, in_place=True)
    return messages.MaskedUpdate(statement.pop("masked"), statement)


def _delta_parts(
    before: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], size: int = 1 << 16
) -> Iterator[np.ndarray]:
    """trained - before in float64, in model order, ``size`` values at a time through one buffer."""
    scratch = np.empty(size, dtype=np.float64)
    for name, b in before.items():
        a = np.asarray(trained[name]).reshape(-1)
        if a.size != b.size:
            raise ValueError(f"trained weight '{name}' has {a.size} values, the global model {b.size}")
        for i in range(0, b.size, size):
            part = scratch[: min(size, b.size - i)]
            np.subtract(a[i : i + size], b[i : i + size], out=part, dtype=np.float64)
            yield part


def _clip_in_place(delta: np.ndarray, clip: float) -> None:
    """[-clip, clip] and finite, in place; the count goes to this node's own log, never to the server."""
    outside = int(np.count_nonzero(~(np.abs(np.nan_to_num(delta, nan=np.inf)) <= clip)))
    np.nan_to_num(delta, copy=False, nan=0.0, posinf=clip, neginf=-clip)
    np.clip(delta, -clip, clip, out=delta)
    from logging import WARNING

    from flwr.common.logger import log

    log(
        WARNING,
        "fedcare: %d update values were outside the secure-aggregation range and were clipped "
        "at this hospital (not reported to the server)",
        outside,
    )


def sign_view(path: Path, consortium: Consortium, request: messages.ViewRequest) -> messages.ViewReply:
    return messages.ViewReply(SecAggNode(path, consortium).sign_view(request.round, request.survivors))


def unmask(path: Path, consortium: Consortium, request: messages.UnmaskRequest) -> messages.UnmaskReply:
    """Reveal this round's shares on the path the request names."""
    node = SecAggNode(path, consortium)
    if request.path == "fast":
        revealed = node.unmask_fast(request.round, request.b_share_ciphertexts, request.statements)
        return messages.UnmaskReply(revealed["b"], {}, list(revealed["complaints"]))
    revealed = node.unmask(
        request.round, request.survivors, request.signatures, request.b_share_ciphertexts, request.statements
    )
    return messages.UnmaskReply(revealed["b"], revealed["s"], list(revealed["complaints"]))


def end(path: Path) -> bool:
    """The run is over: delete its private key material. Returns whether there was any."""
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
