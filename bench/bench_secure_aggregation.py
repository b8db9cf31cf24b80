"""Secure vs plain aggregation, side by side in one run: round time on Flower's Simulation Engine
(10 hospitals, an MLP of ~1M and ~4M parameters) and bytes on the wire per node per round; then
Flower's own legacy SecAgg+ against Flower's plain FedAvg on the same workload (``--no-flower``
skips it).

The hospitals are an `ehr-table` multi-site layout written from scikit-learn's breast-cancer
table (569 patients split across 10 hospital folders), so the runs go through the same loaders,
statistics round, ClientApp and round loop as any fedcare run. Training is plain SGD (no DP):
with a short local epoch the aggregation's share of the round is at its largest, so the ratio
is the conservative one.

    .venv/bin/python bench/bench_secure_aggregation.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import redirect_stdout
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.markdown_report import replace_section

BAR_1M = 2.0  # secure round / plain round at ~1M parameters
BAR_4M = 1.8  # ... at ~4M parameters

HEADING = "### Secure aggregation: round time and bytes against plain aggregation"


def write_hospitals(root: Path, n: int, seed: int = 0) -> None:
    """n hospital folders (table.csv + schema.toml) from the breast-cancer table."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns=lambda c: c.replace(" ", "_"))
    frame.insert(0, "patient_id", [f"p{i:04d}" for i in range(len(frame))])
    features = [c for c in frame.columns if c not in ("patient_id", "target")]
    lines = ["[table]", 'id = "patient_id"', 'label = "target"', "test-fraction = 0.3", ""]
    for col in features:  # benchmark ranges: a generous band around the data (not a clinical claim)
        lines += [f"[numeric.{col}]", f"range = [0.0, {2.0 * float(frame[col].max()):.6g}]", ""]
    order = np.random.default_rng(seed).permutation(len(frame))
    for i, part in enumerate(np.array_split(order, n)):
        folder = root / f"hospital-{i}"
        folder.mkdir(parents=True)
        frame.iloc[part].to_csv(folder / "table.csv", index=False)
        (folder / "schema.toml").write_text("\n".join(lines))
    del pd


def run_once(root: Path, out: Path, hidden: int, secure: bool, rounds: int) -> dict:
    from fedcare.run_config import RunSettings
    from simulation.runner import run

    s = RunSettings(
        dataset="ehr-table",
        model="mlp",
        hidden_units=hidden,
        dp=False,
        num_rounds=rounds,
        batch_size=16,
        learning_rate=0.05,
        weight_decay=0.0,
        hospitals=10,
        min_hospitals=2,
        secure_aggregation=secure,
        data_root=str(root),
        output_dir=str(out),
    )
    lines: list[str] = []
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        outcome = run(s, ledger_dir=out / "ledgers", progress=lines.append)
    wall = time.perf_counter() - t0
    rounds_s = [r.seconds for r in outcome.federation.rounds]
    params = sum(int(np.prod(a.shape)) for a in outcome.federation.arrays.values())
    return {
        "round_s": rounds_s,
        "wall": wall,
        "params": params,
        "accuracy": outcome.results["final"]["pooled"]["accuracy"],
        "lines": lines,
    }


def wire_bytes(params: int, n_nodes: int) -> tuple[int, int]:
    """Serialized train-reply payload per node: plain float32 ArrayRecord vs the masked reply's record
    (the masked vector packed as bytes among its keys, as the ClientApp sends it)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.common.serde import array_record_to_proto, config_record_to_proto

    from bench import secagg_setup
    from secure_aggregation.identity import SimulatedConsortium
    from secure_aggregation.messages import MaskedUpdate
    from secure_aggregation.quantization import Quantizer
    from server.secure_rounds import graph_parameters

    plain = array_record_to_proto(ArrayRecord({"w": Array(np.zeros(params, dtype=np.float32))})).ByteSize()
    state = Path(tempfile.mkdtemp(prefix="fedcare-bench-secagg-"))
    try:
        nodes = list(range(1, n_nodes + 1))
        t, k = graph_parameters(n_nodes)
        fed = secagg_setup.setup(state, 1, t, k, nodes, params + 1, SimulatedConsortium(os.urandom(32)))
        requests = fed.server.start_round(1)
        node = fed.node(nodes[0])
        node.receive_keys(1, requests[nodes[0]]["peers"])
        statement = node.mask(1, Quantizer(10.0).encode(np.zeros(params), 1))
        reply = MaskedUpdate(statement.pop("masked"), statement)
        secure = config_record_to_proto(ConfigRecord(reply.to_config())).ByteSize()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return plain, secure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="rounds per run; the median is over rounds 2.., whose first ones still warm up",
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[990, 1990], help="MLP widths (~1M, ~4M params)")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's legacy SecAgg+ side by side")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    from fedcare.safe_environment import apply_safe_environment

    apply_safe_environment()
    work = Path(tempfile.mkdtemp(prefix="fedcare-bench-secagg-"))
    rows, flower_rows = [], []
    try:
        write_hospitals(work / "data", args.hospitals)
        for hidden in args.hidden:
            result = {}
            for secure in (False, True, False, True):  # interleaved: drift hits both sides alike
                key = "secure" if secure else "plain"
                r = run_once(
                    work / "data", work / f"run-{hidden}-{key}-{len(result.get(key, []))}", hidden, secure, args.rounds
                )
                result.setdefault(key, []).append(r)
                print(
                    f"hidden {hidden}: {key} rounds {[f'{x:.2f}' for x in r['round_s']]} acc {r['accuracy']:.3f}",
                    flush=True,
                )
            # round 1 carries Ray's actor start-up and (secure) nothing else extra: report rounds 2..
            plain = [x for r in result["plain"] for x in r["round_s"][1:]]
            secure = [x for r in result["secure"] for x in r["round_s"][1:]]
            params = result["plain"][0]["params"]
            b_plain, b_secure = wire_bytes(params, args.hospitals)
            rows.append(
                (
                    params,
                    np.median(plain),
                    np.median(secure),
                    b_plain,
                    b_secure,
                    np.mean([r["accuracy"] for r in result["plain"]]),
                    np.mean([r["accuracy"] for r in result["secure"]]),
                )
            )
            if not args.no_flower:
                flower_rows.append((params, *flower_side_by_side(work / "data", hidden, args.hospitals, args.rounds)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "| parameters | plain round s | secure round s | secure / plain | bytes/node/round plain | "
        "bytes/node/round secure | ratio | pooled acc plain | pooled acc secure |",
        "|" + "---|" * 9,
    ]
    for params, p, s, bp, bs, ap, as_ in rows:
        lines.append(
            f"| {params:,} | {p:.2f} | {s:.2f} | {s / p:.2f}x | {bp:,} | {bs:,} | {bs / bp:.2f}x | "
            f"{ap:.3f} | {as_:.3f} |"
        )
    text = "\n".join(
        [
            HEADING,
            "",
            f"Measured {date.today().isoformat()} on {platform.machine()}, {_cores()} cores, Flower Simulation Engine, "
            f"{args.hospitals} hospitals (ehr-table layout from the breast-cancer table), MLP, no DP, "
            f"{args.rounds} rounds x 2 interleaved runs per side; median round time over rounds 2..{args.rounds} "
            "(round 1 includes Ray's actor start-up). Bytes: serialized train-reply records per node. "
            f"Target: a secure round <= {BAR_1M:g}x a plain one at ~1M parameters and <= {BAR_4M:g}x at ~4M, with "
            "every check against a deviating coordinator on (signed keys against the roster, commitments, "
            "robust reconstruction).",
            "",
            "    .venv/bin/python bench/bench_secure_aggregation.py --write docs/benchmarks.md",
            "",
            *lines,
            "",
            "A plain round is one train exchange (each node also evaluates the model it receives, the previous "
            "round's). A secure round adds one unmask exchange when every hospital answered (a second, where each "
            "survivor signs one view of who survived, only after a dropout), and each node sends its update as "
            "uint64 fixed point (2x a float32 update) plus one sealed share per neighbour.",
            *bar_lines(rows),
            *flower_table(flower_rows, args.hospitals, args.rounds),
            "",
        ]
    )
    print(text)
    if args.write:
        replace_section(args.write, HEADING, text)


def bar_lines(rows: list[tuple]) -> list[str]:
    """One line per target: the measured secure / plain ratio against its bar."""
    out = [""]
    for params, p, s, *_ in rows:
        bar = BAR_1M if params < 2_000_000 else BAR_4M
        out.append(
            f"- {params:,} parameters: secure / plain {s / p:.2f}x (target <= {bar:g}x: "
            f"{'met' if s / p <= bar else '**not met**'})."
        )
    return out


def flower_side_by_side(data: Path, hidden: int, nodes: int, rounds: int) -> tuple[float, float]:
    """Median fit-phase seconds (rounds 2..) of Flower's plain FedAvg and of FedAvg under its legacy
    SecAgg+, two interleaved runs each, on the same hospitals, model and training."""
    from bench.flower_secaggplus import run_once as flower_run

    seconds: dict[bool, list[float]] = {False: [], True: []}
    for secure in (False, True, False, True):
        r = flower_run(data, hidden, nodes, rounds, secure)
        seconds[secure] += r[1:]
        print(
            f"hidden {hidden}: Flower {'SecAgg+' if secure else 'plain'} fit rounds {[f'{x:.2f}' for x in r]}",
            flush=True,
        )
    return float(np.median(seconds[False])), float(np.median(seconds[True]))


def flower_table(rows: list[tuple[int, float, float]], nodes: int, rounds: int) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        f"Flower's own SecAgg+ side by side (same run, same {nodes} hospitals, MLP and local training; Flower "
        "1.41's legacy API, `bench/flower_secaggplus.py`): every node shares with every other and the "
        "reconstruction threshold is a majority, as in fedcare; Flower's default 32-bit modulus and 22-bit "
        f"quantisation. A round is the fit phase (`configure_fit` to the end of `aggregate_fit`), median over "
        f"rounds 2..{rounds} of 2 runs per side.",
        "",
        "| parameters | Flower plain fit s | Flower SecAgg+ fit s | SecAgg+ / plain |",
        "|---|---|---|---|",
    ]
    lines += [f"| {params:,} | {p:.2f} | {s:.2f} | {s / p:.2f}x |" for params, p, s in rows]
    return lines


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
