"""Secure aggregation's protocol cost per round against the number of hospitals, in one process.

    .venv/bin/python bench/bench_secagg_protocol.py [--hospitals 10,100,500,1000] [--length 100000] \
        [--write docs/benchmarks.md]

Every hospital's step runs here in turn, from its state file as a fresh ClientApp process would
(no Flower, no network): key agreement once, then rounds with one hospital dropping after masking
(the consistency path: view signatures, then shares of the dropped hospital's key) and rounds
without dropouts (the fast path). Reported per round: a hospital's own work (receive its keys,
mask, sign, unmask; median over the hospitals) and the server's (routing, summing, reconstructing,
unmasking), and the growth of both against the smallest federation measured. The graph and
threshold are the ones the coordinator picks (``server.secure_rounds.graph_parameters``): the
complete graph while it is cheaper, SecAgg+'s neighbourhoods beyond.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from bench import secagg_setup
from bench.markdown_report import replace_section
from secure_aggregation import Quantizer
from secure_aggregation.identity import SimulatedConsortium
from server.secure_rounds import graph_parameters

HEADING = "### Secure aggregation: protocol cost against the number of hospitals"
BAR = 3.0  # a hospital's work per round at 1,000 hospitals, over its work at 100


def measure(n: int, length: int, rounds: int = 2) -> dict[str, float]:
    """Seconds per round (median over rounds): a hospital's work (median over hospitals) and the server's."""
    t, k = graph_parameters(n)
    ids = list(range(1000, 1000 + n))
    q = Quantizer(1.0)
    rng = np.random.default_rng(n)
    encoded = {i: q.encode(rng.uniform(-0.5, 0.5, length), 100) for i in ids}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        fed = secagg_setup.setup(Path(tmp), "bench", t, k, ids, length + 1, SimulatedConsortium(os.urandom(32)))
        setup_s = time.perf_counter() - started
        node_s: list[float] = []
        server_s: dict[str, list[float]] = {"consistency": [], "fast": []}
        node_by_path: dict[str, list[float]] = {"consistency": [], "fast": []}
        for r in range(1, 2 * rounds + 1):
            path = "consistency" if r % 2 else "fast"
            drop = {ids[r]} if path == "consistency" else set()
            own = {i: 0.0 for i in ids if i not in fed.server.excluded}
            server_time = 0.0
            clock = time.perf_counter()
            requests = fed.server.start_round(r)
            server_time += time.perf_counter() - clock
            for nid, req in requests.items():
                clock = time.perf_counter()
                fed.node(nid).receive_keys(r, req["peers"])
                reply = fed.node(nid).mask(r, encoded[nid])
                own[nid] += time.perf_counter() - clock
                if nid in drop:
                    continue
                clock = time.perf_counter()
                fed.server.add_masked(nid, reply)
                server_time += time.perf_counter() - clock
            replies = {}
            clock = time.perf_counter()
            fast = fed.server.fast_path()
            work = fed.server.unmask_fast_requests() if fast else fed.server.view_requests()
            server_time += time.perf_counter() - clock
            if not fast:
                for nid, req in work.items():
                    clock = time.perf_counter()
                    sig = fed.node(nid).sign_view(r, req["survivors"])
                    own[nid] += time.perf_counter() - clock
                    clock = time.perf_counter()
                    fed.server.add_view_signature(nid, sig)
                    server_time += time.perf_counter() - clock
                clock = time.perf_counter()
                work = fed.server.unmask_requests()
                server_time += time.perf_counter() - clock
            for nid, req in work.items():
                clock = time.perf_counter()
                node = fed.node(nid)
                replies[nid] = (
                    node.unmask_fast(r, req["b_share_ciphertexts"], req["statements"])
                    if fast
                    else node.unmask(
                        r, req["survivors"], req["signatures"], req["b_share_ciphertexts"], req["statements"]
                    )
                )
                own[nid] += time.perf_counter() - clock
            clock = time.perf_counter()
            fed.server.finish(replies)
            server_time += time.perf_counter() - clock
            node_by_path[path].append(statistics.median(own.values()))
            server_s[path].append(server_time)
            node_s.append(statistics.median(own.values()))
    return {
        "n": n,
        "t": t,
        "k": k,
        "setup_s": setup_s,
        "node_fast_s": statistics.median(node_by_path["fast"]),
        "node_consistency_s": statistics.median(node_by_path["consistency"]),
        "server_fast_s": statistics.median(server_s["fast"]),
        "server_consistency_s": statistics.median(server_s["consistency"]),
    }


def report(rows: list[dict[str, float]], length: int, write: bool) -> str:
    base = rows[0]
    command = ".venv/bin/python bench/bench_secagg_protocol.py" + (" --write docs/benchmarks.md" if write else "")
    lines = [
        HEADING,
        "",
        f"`{command}` ({date.today()}, {os.cpu_count()} cores, one process, vectors of {length:,} values). "
        "Per round, a hospital's own work (receive its keys, mask, sign, unmask; median over the hospitals) "
        "and the server's, without dropouts (the fast path) and with one hospital dropping after masking "
        "(the consistency path). Growth is against the smallest federation measured. Key agreement runs once "
        f"per run. Target: a hospital's work at 1,000 hospitals <= {BAR:g}x its work at 100.",
        "",
        "| hospitals | graph (k neighbours, threshold t) | hospital, fast | hospital, with a dropout | growth "
        "| server, fast | server, with a dropout | growth | key agreement (all hospitals, once) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        graph = "complete" if row["k"] + 1 >= row["n"] else "SecAgg+"
        lines.append(
            f"| {row['n']:,} | {graph}, k={row['k']}, t={row['t']} | {row['node_fast_s'] * 1e3:.1f} ms | "
            f"{row['node_consistency_s'] * 1e3:.1f} ms | {row['node_consistency_s'] / base['node_consistency_s']:.2f}x | "
            f"{row['server_fast_s'] * 1e3:.0f} ms | {row['server_consistency_s'] * 1e3:.0f} ms | "
            f"{row['server_consistency_s'] / base['server_consistency_s']:.2f}x | {row['setup_s']:.1f} s |"
        )
    by_n = {row["n"]: row for row in rows}
    if 100 in by_n and 1000 in by_n:
        ratio = by_n[1000]["node_consistency_s"] / by_n[100]["node_consistency_s"]
        lines += [
            "",
            f"A hospital's work per round at 1,000 hospitals is {ratio:.2f}x its work at 100 "
            f"(target <= {BAR:g}x: {'met' if ratio <= BAR else '**not met**'}).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", default="10,100,500,1000")
    parser.add_argument("--length", type=int, default=100_000)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    rows = []
    for n in (int(v) for v in args.hospitals.split(",")):
        row = measure(n, args.length)
        rows.append(row)
        print(
            f"{n:5d} hospitals (k={row['k']}, t={row['t']}): hospital {row['node_fast_s'] * 1e3:.1f} / "
            f"{row['node_consistency_s'] * 1e3:.1f} ms, server {row['server_fast_s'] * 1e3:.0f} / "
            f"{row['server_consistency_s'] * 1e3:.0f} ms, key agreement {row['setup_s']:.1f} s",
            flush=True,
        )
    text = report(rows, args.length, args.write is not None)
    print("\n" + text)
    if args.write:
        replace_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
