"""Where DP-SGD loses accuracy on Fed-Heart-Disease: noise, clipping, or Poisson sampling.

Runs the coordinator's real round loop (`server.federation_loop.run_federation`) against the
real ClientApp, routed in this process instead of through Flower's Simulation Engine (plain
aggregation, which secure aggregation reproduces exactly), so ten seeds per variant take seconds.
The variants share the DP pipeline (the statistics round at the hospital's budget, the noise plan,
the ledger) and change only what local training does:

  no DP            `--no-dp`: shuffled batches, no clipping, no noise (the issue's no-DP bar)
  plain SGD in DP  the DP run's normalisation and weights; training as without DP
  Poisson only     DP-SGD with noise 0 and clip norm 100 (never binding): Opacus's Poisson batches
  Poisson + clip   DP-SGD with noise 0 and clip norm 1 (the default)
  DP-SGD           the real thing, epsilon 1 (statistics round included)

The ablation variants override the noise or clip inside training only: their ledgers still
record the planned noise, so they make no privacy claim; they measure what each part costs.

    .venv/bin/python bench/bench_heart_dp_ablation.py --seeds 10 --write docs/benchmarks.md

``--sweep`` instead runs DP-SGD at epsilon 1 with one training setting changed at a time (its
own section): whether any single setting lifts the epsilon-1 result.

    .venv/bin/python bench/bench_heart_dp_ablation.py --sweep --seeds 10 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.dp_trainer as dp_trainer
from bench.markdown_report import replace_section
from client.client_app import make_client_app
from fedcare.run_config import RunSettings
from server.federation_loop import run_federation
from simulation.hospital_policy import simulated_policy

RUN_ID = 7
HEADING = "### Fed-Heart-Disease: where DP-SGD loses accuracy"
SWEEP_HEADING = "### Fed-Heart-Disease: DP-SGD at epsilon 1 against its training settings"
# one change from the defaults per row (RunSettings field -> value)
SWEEP = [
    {},
    {"learning_rate": 0.2},
    {"learning_rate": 0.5},
    {"batch_size": 15},
    {"batch_size": 60},
    {"num_rounds": 10},
    {"num_rounds": 25},
    {"local_epochs": 2},
    {"max_grad_norm": 0.5},
    {"max_grad_norm": 2.0},
]
# (label, DP on, what training does instead: None = as configured, "plain", or (noise, clip))
VARIANTS = [
    ("no DP", False, None),
    ("plain SGD in the DP pipeline", True, "plain"),
    ("DP-SGD, noise 0, clip 100 (Poisson sampling only)", True, (0.0, 100.0)),
    ("DP-SGD, noise 0, clip 1 (Poisson sampling + clipping)", True, (0.0, 1.0)),
    ("DP-SGD, epsilon 1", True, None),
]


class _InProcessGrid:
    """Routes each message to its node's ClientApp in this process, as a SuperLink would."""

    def __init__(self, ledger_dir: Path, s: RunSettings) -> None:
        self.app = make_client_app()
        # the hospitals accept the run as `fedcare simulate`'s do (its DP and aggregation, budget = epsilon)
        policy = simulated_policy(s, s.target_epsilon).to_node_config()
        self.contexts = {
            100 + i: Context(
                RUN_ID,
                100 + i,
                {"partition-id": i, "ledger-dir": str(ledger_dir), **policy},
                RecordDict(),
                {},
            )
            for i in range(4)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def _training(override):
    """``dp_trainer.train`` with the variant's change; the accountant's steps are kept as planned."""
    real = dp_trainer.train

    def train(model, x, y, *, dp, **kwargs):
        if override is None or dp is None:
            return real(model, x, y, dp=dp, **kwargs)
        if override == "plain":
            done = real(model, x, y, dp=None, **kwargs)
            batches = dp_trainer.steps_per_epoch(len(y), kwargs["batch_size"])
            steps = [(dp.noise_multiplier, 1 / batches, batches * kwargs["epochs"])]
            return dp_trainer.TrainOutcome(steps=steps, mean_loss=done.mean_loss)
        noise, clip = override
        done = real(model, x, y, dp=dp_trainer.DPSettings(noise, clip), **kwargs)
        steps = [(dp.noise_multiplier, q, k) for _, q, k in done.steps]
        return dp_trainer.TrainOutcome(steps=steps, mean_loss=done.mean_loss)

    return train


def pooled_accuracy(seed: int, dp: bool, override, settings: dict) -> float:
    real = dp_trainer.train
    dp_trainer.train = _training(override)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = RunSettings(seed=seed, dp=dp, secure_aggregation=False, output_dir=str(Path(tmp) / "out"), **settings)
            result = run_federation(
                _InProcessGrid(Path(tmp) / "ledgers", s),
                s,
                4,
                lambda _: None,
                timeout=120,
                run_id=RUN_ID,
            )
    finally:
        dp_trainer.train = real
    return float(result.rounds[-1].evaluation["pooled"]["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=None, help="override the default for every variant")
    parser.add_argument("--sweep", action="store_true", help="DP-SGD at epsilon 1, one setting changed at a time")
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose section to rewrite")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1
    if args.sweep:
        sweep(args.seeds, args.write)
        return
    settings = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}
    rows = []
    for label, dp, override in VARIANTS:
        accs = [pooled_accuracy(seed, dp, override, settings) for seed in range(args.seeds)]
        rows.append((label, statistics.mean(accs), statistics.pstdev(accs), statistics.mean(accs[:5])))
        print(f"{label:55s} {rows[-1][1]:.3f} ± {rows[-1][2]:.3f}  (seeds 0-4: {rows[-1][3]:.3f})", flush=True)
    command = "    .venv/bin/python bench/bench_heart_dp_ablation.py --seeds " + str(args.seeds)
    if args.weight_decay is not None:
        command += f" --weight-decay {args.weight_decay:g}"
    lines = [
        HEADING,
        "",
        f"Measured {date.today()} on {platform.machine()}, {platform.system()}; the coordinator's round loop and the real "
        f"ClientApp in one process (plain aggregation), defaults (15 rounds x 1 epoch, batch 30, learning rate 0.3, "
        f"weight decay {settings.get('weight_decay', RunSettings().weight_decay):g}, delta 1e-4), seeds "
        f"0..{args.seeds - 1}. Pooled test accuracy (254 patients), mean ± std over seeds. Command:",
        "",
        command + " --write docs/benchmarks.md",
        "",
        "| training | pooled acc | seeds 0-4 |",
        "|---|---|---|",
        *[f"| {label} | {mean:.3f} ± {std:.3f} | {first:.3f} |" for label, mean, std, first in rows],
    ]
    print("\n".join(lines))
    if args.write:
        replace_section(args.write, HEADING, "\n".join(lines))


def sweep(seeds: int, write: Path | None) -> None:
    """DP-SGD at epsilon 1 (statistics round included) with one training setting changed per row."""
    rows = []
    for change in SWEEP:
        accs = [pooled_accuracy(seed, True, None, {"target_epsilon": 1.0, **change}) for seed in range(seeds)]
        label = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in change.items()) or "defaults"
        rows.append((label, statistics.mean(accs), statistics.pstdev(accs)))
        print(f"{label:30s} {rows[-1][1]:.3f} ± {rows[-1][2]:.3f}", flush=True)
    lines = [
        SWEEP_HEADING,
        "",
        f"Measured {date.today()} on {platform.machine()}, {platform.system()}; same loop as the ablation above, "
        f"DP-SGD at epsilon 1 (delta 1e-4, statistics round included), defaults (15 rounds x 1 epoch, batch 30, "
        f"learning rate 0.3, clip norm 1, weight decay {RunSettings().weight_decay:g}) with one setting changed per "
        f"row, seeds 0..{seeds - 1}. Pooled test accuracy, mean ± std over seeds. Target at epsilon 1: 0.785. Command:",
        "",
        f"    .venv/bin/python bench/bench_heart_dp_ablation.py --sweep --seeds {seeds} --write docs/benchmarks.md",
        "",
        "| change from the defaults | pooled acc at epsilon 1 |",
        "|---|---|",
        *[f"| {label} | {mean:.3f} ± {std:.3f} |" for label, mean, std in rows],
        "",
    ]
    print("\n".join(lines))
    if write:
        replace_section(write, SWEEP_HEADING, "\n".join(lines))


if __name__ == "__main__":
    main()
