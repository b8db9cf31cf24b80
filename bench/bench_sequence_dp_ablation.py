"""Where DP-SGD loses AUC on PBC2 event sequences (DP GRU, 3 hospitals), and what reduces the loss.

Runs the coordinator's real round loop (`server.federation_loop.run_federation`) against the real
ClientApp, routed in this process instead of through Flower's Simulation Engine (plain aggregation,
which secure aggregation reproduces exactly), like ``bench/bench_heart_dp_ablation.py``. The PBC2
hospitals are prepared once (`fedcare data prepare pbc2 DIR`) into a temporary folder and reused by
every run. Every run starts from the pbc2 preset (15 rounds x 1 epoch, batch 16, learning rate 0.5,
epsilon 3, 3 hospitals) and changes one thing:

  no DP            `--no-dp`: shuffled batches, no clipping, no noise
  Poisson + clip   DP-SGD with the noise set to 0 inside training (Poisson batches, clip norm 1):
                   what sampling and clipping cost before any noise
  DP-SGD           the real thing at epsilon 3 (preset) and epsilon 1, statistics round included
  candidates       at epsilon 3 and 1, one setting changed: GRU width (hidden-units 8, 16; the
                   preset's GRU has 32), learning rate, batch size, clip norm, stats-budget-fraction,
                   rounds, local epochs, personalise-rounds 0 (the final local fine-tuning is planned
                   and charged inside the same budget, so dropping it lowers the noise of the
                   federation's rounds)

The noise-0 row overrides the noise inside training only: its ledger still records the planned
noise, so it makes no privacy claim; it measures what clipping and sampling cost. Every hospital's
noise and batches are keyed from the run seed (the simulation's reproducible noise: the table can
be re-run exactly, and none of these runs is private).

The GRU's width: ``build_model`` builds the GRU at its fixed 32 units and ignores hidden-units
(documented as the MLP's width); the hidden-units rows build it at the run's hidden-units instead,
in this process only, on both the coordinator's and the hospitals' side.

    .venv/bin/python bench/bench_sequence_dp_ablation.py --seeds 5 --candidate-seeds 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.dp_trainer as dp_trainer
import server.federation_loop as federation_loop
import shared_models.registry as registry
from bench.markdown_report import replace_section
from client.client_app import REPRODUCIBLE_NOISE, make_client_app
from fedcare.run_config import DATASET_PRESETS, RunSettings
from server.federation_loop import run_federation
from simulation.generated_data import prepare_dataset
from simulation.hospital_policy import simulated_policy

RUN_ID = 7
DATASET = "pbc2"
HEADING = "### PBC2 event sequences: where DP-SGD loses AUC"
PRESET = DATASET_PRESETS[DATASET]
HOSPITALS = int(PRESET["hospitals"])
GRU_DEFAULT_HIDDEN = 32  # SequenceGRU's fixed width (what the preset trains)

# (label, settings over the preset, what training does instead: None = as configured, or (noise, clip))
BASE = [
    ("no DP", {"dp": False}, None),
    ("Poisson + clip, noise 0", {}, (0.0, None)),
    ("DP-SGD, epsilon 3 (preset)", {"target_epsilon": 3.0}, None),
    ("DP-SGD, epsilon 1", {"target_epsilon": 1.0}, None),
]
# one change from the preset per row (RunSettings field -> value)
CANDIDATES = [
    {"hidden_units": 8},
    {"hidden_units": 16},
    {"learning_rate": 0.2},
    {"learning_rate": 1.0},
    {"batch_size": 32},
    {"max_grad_norm": 0.5},
    {"max_grad_norm": 2.0},
    {"stats_budget_fraction": 0.05},
    {"num_rounds": 25},
    {"local_epochs": 2},
    {"personalise_rounds": 0},
]
EPSILONS = (3.0, 1.0)


class _InProcessGrid:
    """Routes each message to its node's ClientApp in this process, as a SuperLink would."""

    def __init__(self, ledger_dir: Path, s: RunSettings, data_root: Path) -> None:
        # the hospitals accept the run as `fedcare simulate` does (simulated_policy: the run's DP and
        # aggregation, a budget of the run's epsilon)
        self.app = make_client_app(
            {
                **simulated_policy(s).to_node_config(),
                REPRODUCIBLE_NOISE: s.seed,
                "cache-dir": str(data_root / ".fedcare-cache"),
            }
        )
        self.contexts = {
            100 + i: Context(
                RUN_ID,
                100 + i,
                {"partition-id": i, "ledger-dir": str(ledger_dir), "data-root": str(data_root)},
                RecordDict(),
                {},
            )
            for i in range(HOSPITALS)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def _training(override):
    """``dp_trainer.train`` with the variant's noise (and clip) in training; the accountant's steps
    keep the planned noise, so the ledger and plan checks see what was planned."""
    real = dp_trainer.train

    def train(model, x, y, *, dp, **kwargs):
        if override is None or dp is None:
            return real(model, x, y, dp=dp, **kwargs)
        noise, clip = override
        changed = dataclasses.replace(
            dp, noise_multiplier=noise, max_grad_norm=dp.max_grad_norm if clip is None else clip
        )
        done = real(model, x, y, dp=changed, **kwargs)
        steps = [(dp.noise_multiplier, q, k) for _, q, k in done.steps]
        return dp_trainer.TrainOutcome(steps=steps, mean_loss=done.mean_loss)

    return train


def _build_model(name, input_shape, hidden_units=32):
    """``registry.build_model``, with the GRU at ``hidden_units`` (the registry fixes it at 32)."""
    if name == "gru":
        from shared_models.sequence_gru import SequenceGRU

        shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(v) for v in input_shape)
        registry._expect(name, shape, 2, "(steps, features + mask)")
        return SequenceGRU(shape[-1] - 1, hidden=hidden_units)
    return _REAL_BUILD(name, input_shape, hidden_units)


_REAL_BUILD = registry.build_model


@contextmanager
def _patched(override) -> Iterator[None]:
    real_train = dp_trainer.train
    dp_trainer.train = _training(override)
    registry.build_model = federation_loop.build_model = _build_model
    try:
        yield
    finally:
        dp_trainer.train = real_train
        registry.build_model = federation_loop.build_model = _REAL_BUILD


def pooled_auc(seed: int, override, settings: dict, data_root: Path) -> float:
    with _patched(override), tempfile.TemporaryDirectory() as tmp:
        s = RunSettings.for_dataset(
            DATASET,
            seed=seed,
            secure_aggregation=False,
            data_root=str(data_root),
            output_dir=str(Path(tmp) / "out"),
            **settings,
        )
        result = run_federation(
            _InProcessGrid(Path(tmp) / "ledgers", s, data_root),
            s,
            HOSPITALS,
            lambda _: None,
            timeout=300,
            run_id=RUN_ID,
        )
    if result.stopped_early is not None:
        raise SystemExit(f"{settings}: the run stopped early: {result.stopped_early}")
    return float(result.rounds[-1].evaluation["pooled"]["auc"])


def _describe(change: dict) -> str:
    names = {
        "hidden_units": "hidden-units",
        "learning_rate": "lr",
        "batch_size": "batch",
        "max_grad_norm": "clip",
        "stats_budget_fraction": "stats-budget-fraction",
        "num_rounds": "rounds",
        "local_epochs": "local epochs",
        "personalise_rounds": "personalise-rounds",
        "target_epsilon": "epsilon",
    }
    return ", ".join(
        "no DP" if k == "dp" else f"{names.get(k, k.replace('_', '-'))} {v:g}"
        for k, v in change.items()
        if not (k == "dp" and v)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the no-DP, noise-0 and DP rows")
    parser.add_argument("--candidate-seeds", type=int, default=3, help="seeds of each candidate row")
    parser.add_argument("--no-candidates", action="store_true", help="only the no-DP, noise-0 and DP rows")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to rewrite")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1
    started = time.perf_counter()
    rows: list[tuple[str, str, list[float]]] = []

    def measure(label: str, settings: dict, override, seeds: int) -> None:
        t0 = time.perf_counter()
        aucs = [pooled_auc(seed, override, settings, data_root) for seed in range(seeds)]
        rows.append((label, _describe(settings) or "preset", aucs))
        print(
            f"{label:40s} {_describe(settings):40s} {statistics.mean(aucs):.3f} ± {statistics.pstdev(aucs):.3f}"
            f"  [{' '.join(f'{a:.3f}' for a in aucs)}]  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="fedcare-bench-seqdp-") as work:
        data_root = Path(work) / "pbc2"
        prepare_dataset(DATASET, data_root, HOSPITALS)
        for label, settings, override in BASE:
            measure(label, settings, override, args.seeds)
        if not args.no_candidates:
            for epsilon in EPSILONS:
                base = f"DP-SGD, epsilon {epsilon:g}"
                if args.candidate_seeds != args.seeds:  # the reference on the candidates' own seeds
                    measure(base + " (candidates' seeds)", {"target_epsilon": epsilon}, None, args.candidate_seeds)
                for change in CANDIDATES:
                    measure(base, {"target_epsilon": epsilon, **change}, None, args.candidate_seeds)
    no_dp = statistics.mean(rows[0][2])
    command = (
        f"    .venv/bin/python bench/bench_sequence_dp_ablation.py --seeds {args.seeds} "
        f"--candidate-seeds {args.candidate_seeds}" + (" --no-candidates" if args.no_candidates else "")
    )
    lines = [
        HEADING,
        "",
        f"Measured {date.today()} on {platform.machine()}, {platform.system()}; the coordinator's round loop and the "
        f"real ClientApp in one process (plain aggregation, noise and batches keyed from the seed), pbc2 preset "
        f"({PRESET['num_rounds']} rounds x 1 epoch, batch {PRESET['batch_size']}, learning rate "
        f"{PRESET['learning_rate']:g}, clip norm {RunSettings().max_grad_norm:g}, GRU {GRU_DEFAULT_HIDDEN} units, "
        f"stats-budget-fraction {RunSettings().stats_budget_fraction:g}, personalise-rounds "
        f"{RunSettings().personalise_rounds}, delta {RunSettings().delta:g}, {HOSPITALS} hospitals) with one "
        f"change per row; seeds 0..{args.seeds - 1} for the first four rows, 0..{args.candidate_seeds - 1} for the "
        f"candidate rows. Pooled test AUC of the federated model (83 patients), mean ± std over seeds; "
        f'"vs no DP" is the difference of means. Total {time.perf_counter() - started:.0f} s. Command:',
        "",
        command + " --write docs/benchmarks.md",
        "",
        "| variant | settings | pooled AUC | vs no DP |",
        "|---|---|---|---|",
        *[
            f"| {label} | {settings} | {statistics.mean(aucs):.3f} ± {statistics.pstdev(aucs):.3f} | "
            f"{statistics.mean(aucs) - no_dp:+.3f} |"
            for label, settings, aucs in rows
        ],
        "",
    ]
    print("\n".join(lines))
    if args.write:
        replace_section(args.write, HEADING, "\n".join(lines))


if __name__ == "__main__":
    main()
