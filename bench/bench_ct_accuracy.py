"""3D CT classification (generated CT series, DP 3D CNN): federated vs local-only vs pooled-trained
AUC per hospital, through the real `fedcare simulate --dataset synthetic-ct` at its preset.

    .venv/bin/python bench/bench_ct_accuracy.py --seeds 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_task_accuracy import dataset_section, run_seeds
from bench.markdown_report import replace_section
from fedcare.dataset_registry import REGISTRY

HEADING = "### 3D CT classification"
DATASET = "synthetic-ct"
TITLE = "generated CT series, 4 scanners, DP 3D CNN (preset: epsilon 8)"


def federation_pays_off(tables: list[dict]) -> list[str]:
    """One line per hospital: mean federated AUC against mean local-only AUC over the seeds."""
    lines = []
    for index, row in enumerate(tables[0]["hospitals"]):
        fed = np.mean([t["hospitals"][index]["fed"]["auc"] for t in tables])
        local = np.mean([t["hospitals"][index]["local"]["auc"] for t in tables])
        wins = sum(t["hospitals"][index]["fed"]["auc"] >= t["hospitals"][index]["local"]["auc"] for t in tables)
        lines.append(
            f"- {row['name']}: federated AUC {fed:.3f} against local-only {local:.3f} "
            f"({'>=' if fed >= local else '<'}; federated >= local-only in {wins} of {len(tables)} seeds)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcare-bench-ct-"))
    try:
        tables, seconds = run_seeds(DATASET, args.seeds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p = REGISTRY[DATASET].preset
    text = "\n".join(
        [
            HEADING,
            "",
            f"Measured {date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores: real Simulation "
            "Engine runs of `fedcare simulate --dataset synthetic-ct --pooled-baseline` at the preset "
            f"({p['hospitals']} hospitals, each its own scanner; {p['num_rounds']} rounds of {p['local_epochs']} local "
            f"epochs, batch {p['batch_size']}, learning rate {p['learning_rate']}, DP at epsilon "
            f"{p['target_epsilon']:g}, secure aggregation); mean ± std over {args.seeds} seeds (each seed its own model initialisation and generated "
            "studies). Local-only and pooled-trained models are trained with the same DP budget and pipeline.",
            "",
            f"    .venv/bin/python bench/bench_ct_accuracy.py --seeds {args.seeds} --write docs/benchmarks.md",
            "",
            dataset_section(TITLE, tables, seconds),
            "Federated against local-only, per hospital (target: federated >= local-only at every hospital):",
            "",
            *federation_pays_off(tables),
            "",
        ]
    )
    print(text)
    if args.write:
        replace_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
