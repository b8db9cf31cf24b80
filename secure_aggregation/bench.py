"""Measure secure aggregation cost: ``python -m secure_aggregation.bench [--nodes 10] [--length 1000000]``.

Reports the time one node needs to mask a vector, the server's unmasking time (no dropout and
one dropout), and the bytes a node sends and receives per round compared with a plain float32
update. Payload bytes only (values, not keys or protobuf framing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from secure_aggregation import inprocess as ip
from secure_aggregation.node_half import SecAggNode
from secure_aggregation.quantization import Quantizer


def payload_bytes(obj: Any) -> int:
    """Bytes carried by a payload: bytes values, arrays, and 8 bytes per int."""
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, bool) or obj is None:
        return 1
    if isinstance(obj, int):
        return 8
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return len(str(obj))


def _round(n: int, length: int, drop: int, state_dir: Path) -> dict[str, float]:
    ids = list(range(1, n + 1))
    t = n // 2 + 1
    q = Quantizer(1.0)
    rng = np.random.default_rng(0)
    encoded = {i: q.encode(rng.uniform(-1, 1, length), int(rng.integers(1, 1000))) for i in ids}
    server = ip.setup(state_dir, f"bench-{drop}", t, ids, length + 1)
    requests = server.start_round(1)
    mask_times, sent, received = [], [], []
    for nid, req in requests.items():
        if nid > n - drop:
            continue
        path = ip.state_path(state_dir, server.run_id, nid)
        t0 = time.perf_counter()
        SecAggNode(path).receive_keys(1, req["s_public_keys"], req["s_share_ciphertexts"])
        reply = SecAggNode(path).mask(1, encoded[nid])
        mask_times.append(time.perf_counter() - t0)
        server.add_masked(nid, reply)
        sent.append(payload_bytes(reply))
        received.append(payload_bytes(req))
    unmask = server.unmask_requests()
    replies = {}
    for nid, req in unmask.items():
        path = ip.state_path(state_dir, server.run_id, nid)
        replies[nid] = SecAggNode(path).unmask(1, req["survivors"], req["dropped"], req["b_share_ciphertexts"])
        received[nid - 1] += payload_bytes(req)
        sent[nid - 1] += payload_bytes(replies[nid])
    t0 = time.perf_counter()
    server.finish(replies)
    finish = time.perf_counter() - t0
    return {
        "mask_s": float(np.median(mask_times)),
        "finish_s": finish,
        "sent": float(np.median(sent)),
        "received": float(np.median(received)),
    }


def main(argv: list[str] | None = None) -> None:
    """Print the measurements."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--length", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    n, length = args.nodes, args.length
    with tempfile.TemporaryDirectory() as tmp:
        plain = _round(n, length, 0, Path(tmp))
        dropped = _round(n, length, 1, Path(tmp))
    float32 = 4 * length
    print(f"{n} nodes, {length:,} parameters (threshold {n // 2 + 1})")
    print(f"  node: receive keys + mask, median       {plain['mask_s'] * 1000:8.1f} ms")
    print(f"  server finish, no dropout                {plain['finish_s'] * 1000:8.1f} ms")
    print(f"  server finish, 1 dropout                 {dropped['finish_s'] * 1000:8.1f} ms")
    ratio = plain["sent"] / float32
    print(f"  node sends per round (masked + shares)   {plain['sent']:12,.0f} B  ({ratio:.3f}x float32)")
    print(f"  node receives per round (keys + shares)  {plain['received']:12,.0f} B  (besides the model)")
    print(f"  plain float32 update                     {float32:12,.0f} B")
    print(f"  overhead beyond the uint64 vector        {plain['sent'] - 8 * (length + 1):12,.0f} B sent")


if __name__ == "__main__":
    main()
