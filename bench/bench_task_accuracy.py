"""Sequence (PBC2, DP GRU) and imaging (synthetic DICOM, DP CNN) tasks: federated vs local-only vs
pooled-training accuracy and AUC per hospital, through the real `fedcare simulate`.

    .venv/bin/python bench/bench_task_accuracy.py --seeds 2 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.markdown_report import replace_section

HEADING = "### Sequence and imaging tasks"

TASKS = {
    "pbc2": "PBC2 longitudinal labs, 3 hospitals, DP GRU (preset: epsilon 3)",
    "synthetic-imaging": "synthetic DICOM, 4 scanners, DP CNN (preset: epsilon 8)",
}


def run(dataset: str, seed: int, work: Path, extra: tuple[str, ...] = ()) -> tuple[dict, float]:
    """One `fedcare simulate` run (``extra``: more options, e.g. ``--task segment``); its table and wall time."""
    out = work / "-".join([dataset, str(seed), *(arg.lstrip("-") for arg in extra)])
    cmd = [
        sys.executable,
        "-m",
        "fedcare.cli",
        "simulate",
        "--dataset",
        dataset,
        "--seed",
        str(seed),
        "--pooled-baseline",
        "--data-root",
        str(work / "data" / dataset),
        "--output-dir",
        str(out),
        *extra,
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())["table"], time.perf_counter() - t0


def run_seeds(
    dataset: str, seeds: int, work: Path, extra: tuple[str, ...] = (), metrics: tuple[str, str] = ("accuracy", "auc")
) -> tuple[list[dict], list[float]]:
    """``run`` for seeds 0..seeds-1, a line printed per seed; the tables and the wall times."""
    tables, seconds = [], []
    for seed in range(seeds):
        table, sec = run(dataset, seed, work, extra)
        tables.append(table)
        seconds.append(sec)
        fed = table["pooled"]["fed"]
        figures = " ".join(f"{LABELS[m]} {fed[m]:.3f}" for m in metrics)
        print(f"{dataset} seed {seed}: pooled federated {figures} ({sec:.0f} s)", flush=True)
    return tables, seconds


LABELS = {"accuracy": "acc", "auc": "AUC", "dice": "Dice"}


def dataset_section(
    title: str, tables: list[dict], seconds: list[float], metrics: tuple[str, str] = ("accuracy", "auc")
) -> str:
    """One dataset's per-hospital table: mean ± std over the seeds' ``results.json`` tables."""
    names = [r["name"] for r in tables[0]["hospitals"]] + ["pooled"]
    a, b = (LABELS[m] for m in metrics)
    # the federated model fine-tuned at each hospital inside its epsilon, where the run personalised
    personal = any(r.get("personalised") for t in tables for r in t["hospitals"])
    lines = [
        f"#### {title}",
        "",
        f"| hospital | train | test | fed {a} | fed {b} | "
        + (f"personalised {a} | personalised {b} | " if personal else "")
        + f"local {a} | local {b} | pooled-trained {a} | pooled-trained {b} | epsilon spent |",
        "|" + "---|" * (12 if personal else 10),
    ]
    for name in names:
        rows = [
            t["pooled"] if name == "pooled" else next(r for r in t["hospitals"] if r["name"] == name) for t in tables
        ]

        def ms(kind: str, metric: str) -> str:
            vals = [r[kind][metric] for r in rows if (r.get(kind) or {}).get(metric) is not None]  # noqa: B023
            return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "-"

        eps = max(r["epsilon"] or 0.0 for r in rows)
        label = f"**{name}**" if name == "pooled" else name
        lines.append(
            f"| {label} | {rows[0]['train_n']} | {rows[0]['test_n']} | {ms('fed', metrics[0])} | "
            f"{ms('fed', metrics[1])} | "
            + (f"{ms('personalised', metrics[0])} | {ms('personalised', metrics[1])} | " if personal else "")
            + f"{ms('local', metrics[0])} | {ms('local', metrics[1])} | "
            f"{ms('central', metrics[0])} | {ms('central', metrics[1])} | {eps:.2f} |"
        )
    lines += ["", f"Wall time per run, data preparation included: {np.mean(seconds):.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcare-bench-tasks-"))
    sections = []
    try:
        for dataset, title in TASKS.items():
            tables, seconds = run_seeds(dataset, args.seeds, work)
            sections.append(dataset_section(title, tables, seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(
        [
            HEADING,
            "",
            f"Measured {date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores, real Simulation "
            f"Engine runs with each dataset's preset and secure aggregation on; mean ± std over {args.seeds} seeds. "
            '"pooled-trained" is one model trained with the same DP budget on all hospitals\' rows in one place '
            "(the central reference a federation is judged against).",
            "",
            f"    .venv/bin/python bench/bench_task_accuracy.py --seeds {args.seeds} --write docs/benchmarks.md",
            "",
            *sections,
        ]
    )
    print(text)
    if args.write:
        replace_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
