"""3D CT classification (DP 3D CNN) or lesion segmentation (DP U-Net) on generated CT series:
federated vs local-only vs pooled-trained AUC (Dice) per hospital, through the real
`fedcare simulate --dataset synthetic-ct [--task segment]` at its preset.

    .venv/bin/python bench/bench_ct_accuracy.py --seeds 3 --write docs/benchmarks.md
    .venv/bin/python bench/bench_ct_accuracy.py --task segment --seeds 3 --write docs/benchmarks.md
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

from bench.bench_task_accuracy import LABELS, dataset_section, run_seeds
from bench.markdown_report import replace_section
from fedcare.dataset_registry import REGISTRY
from fedcare.run_config import RUN_DEFAULTS, personalise_lr_scale

DATASET = "synthetic-ct"
CLASSIFY_HEADING = "### 3D CT classification"
SEGMENT_HEADING = "### 3D CT lesion segmentation"
# per task: the section heading, the table's title, its two figures (the first one is the target's)
TASKS = {
    "classify": (CLASSIFY_HEADING, "generated CT series, 4 scanners, DP 3D CNN", ("auc", "accuracy")),
    "segment": (
        SEGMENT_HEADING,
        "generated CT series with DICOM SEG masks, 4 scanners, DP U-Net; Dice over the test studies with a "
        "lesion, AUC of lesion detection per study (largest voxel probability)",
        ("dice", "auc"),
    ),
}


def federation_pays_off(tables: list[dict], metric: str) -> list[str]:
    """One line per hospital: mean federated (and personalised) ``metric`` against mean local-only
    over the seeds, and in how many seeds each was at least local-only's."""
    lines = []
    label = LABELS[metric]
    for index, row in enumerate(tables[0]["hospitals"]):
        rows = [t["hospitals"][index] for t in tables]
        local = [(r["local"] or {}).get(metric) for r in rows]
        line = f"- {row['name']}: local-only {label} {_mean(local):.3f}; "
        parts = []
        for kind, name in (("fed", "federated"), ("personalised", "personalised")):
            values = [(r.get(kind) or {}).get(metric) for r in rows]
            pairs = [(v, own) for v, own in zip(values, local) if v is not None and own is not None]
            if pairs:
                mean = _mean([v for v, _ in pairs])
                wins = sum(v >= own for v, own in pairs)
                parts.append(
                    f"{name} {mean:.3f} ({'>=' if mean >= _mean(local) else '<'}; >= local-only in {wins} of "
                    f"{len(pairs)} seeds)"
                )
        lines.append(line + ", ".join(parts))
    return lines


def _mean(values: list) -> float:
    return float(np.mean([v for v in values if v is not None]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--task", choices=tuple(TASKS), default="classify")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    heading, title, (target, other) = TASKS[args.task]
    metrics = (target, other) if target == "dice" else (other, target)  # the table reads acc, AUC or Dice, AUC
    work = Path(tempfile.mkdtemp(prefix="fedcare-bench-ct-"))
    try:
        tables, seconds = run_seeds(DATASET, args.seeds, work, ("--task", args.task), metrics)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p = REGISTRY[DATASET].preset_for(args.task)
    command = "bench/bench_ct_accuracy.py" + (" --task segment" if args.task == "segment" else "")
    optimizer = {"adam": "DP-Adam", "sgd": "DP-SGD"}[p.get("local_optimizer", "sgd")]
    text = "\n".join(
        [
            heading,
            "",
            f"Measured {date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores: real Simulation "
            f"Engine runs of `fedcare simulate --dataset synthetic-ct --task {args.task} --pooled-baseline` at the preset "
            f"({p['hospitals']} hospitals, each its own scanner; {p['num_rounds']} rounds of {p['local_epochs']} local "
            f"epochs, batch {p['batch_size']}, {optimizer} at learning rate {p['learning_rate']}"
            + (f", clipping norm {p['max_grad_norm']}" if "max_grad_norm" in p else "")
            + ", epsilon "
            f"{p['target_epsilon']:g}, secure aggregation); mean ± std over {args.seeds} seeds (each seed its own model initialisation and generated "
            "studies). Local-only and pooled-trained models are trained with the same DP budget and pipeline.",
            "",
            f"    .venv/bin/python {command} --seeds {args.seeds} --write docs/benchmarks.md",
            "",
            dataset_section(f"{title} (preset: epsilon {p['target_epsilon']:g})", tables, seconds, metrics),
            f"Federated and personalised (the federated model fine-tuned at the hospital for "
            f"{p.get('personalise_rounds', RUN_DEFAULTS['personalise_rounds'])} rounds at "
            f"{personalise_lr_scale(p.get('personalise_lr_scale', RUN_DEFAULTS['personalise_lr_scale']), dp=True):g} "
            "of the learning rate, inside the same epsilon) against "
            f"local-only, per hospital (target: federated >= local-only {LABELS[target]} at every hospital):",
            "",
            *federation_pays_off(tables, target),
            "",
        ]
    )
    print(text)
    if args.write:
        replace_section(args.write, SEGMENT_HEADING if args.task == "segment" else CLASSIFY_HEADING, text)


if __name__ == "__main__":
    main()
