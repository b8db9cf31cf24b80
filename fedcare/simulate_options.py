"""The options of `fedcare simulate`, one typer ``Annotated`` alias each, so that the command's signature stays short.

Each alias holds the option's flags and help text; the command gives the default. The help text's
bracketed defaults come from the dataset presets and ``RUN_DEFAULTS`` (fedcare.run_config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcare.run_config import RUN_DEFAULTS

Dataset = Annotated[
    str,
    typer.Option(
        help="fed-heart-disease (4 real hospitals, tables) | "
        "pbc2 (real PBC2 lab sequences split across hospitals) | "
        "synthetic-imaging (generated DICOM hospitals) | synthetic-ct (generated CT series, 3D) | "
        "ehr-table / ehr-events "
        "(your own multi-site tables under --data-root)"
    ),
]
Rounds = Annotated[int | None, typer.Option("--rounds", help="federated rounds [dataset preset]")]
LocalEpochs = Annotated[int | None, typer.Option(help="local epochs per round [preset]")]
PersonaliseRounds = Annotated[
    int | None,
    typer.Option(
        help="rounds of local fine-tuning of the final model at each hospital, under its DP plan (0: none) [2]"
    ),
]
PersonaliseLrScale = Annotated[
    float | None,
    typer.Option(help="personalisation's learning rate as a multiple of --learning-rate [0: 0.3 with DP, 1.0 without]"),
]
Strategy = Annotated[str | None, typer.Option(help="fedavg | fedprox | fedadam [fedavg]")]
Task = Annotated[
    str | None,
    typer.Option(
        help="classify (a label per patient) | segment (a lesion mask per volume: synthetic-ct, dicom-series) [classify]"
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        help="auto | logistic | mlp (tables) | gru (sequences) | cnn (images) | cnn3d | densenet3d (volumes) | "
        "unet3d (--task segment)"
    ),
]
Epsilon = Annotated[float | None, typer.Option(help="target epsilon each hospital may spend in this run [preset]")]
Delta = Annotated[float | None, typer.Option(help="delta per hospital [1e-4]")]
Dp = Annotated[bool, typer.Option("--dp/--no-dp", help="DP-SGD at every hospital (default) or plain SGD")]
SecureAggregation = Annotated[
    bool,
    typer.Option(
        "--secure-aggregation/--no-secure-aggregation",
        help="masked updates: the server learns only each round's sum (default on)",
    ),
]
EpsilonBudget = Annotated[
    float | None, typer.Option(help="each hospital's lifetime budget on its data (default: --epsilon)")
]
BatchSize = Annotated[int | None, typer.Option(help="expected local batch size (Poisson sampling) [preset]")]
LearningRate = Annotated[float | None, typer.Option(help="local learning rate [preset]")]
LocalOptimizer = Annotated[
    str | None, typer.Option(help="sgd | adam: the hospitals' local steps (DP-SGD / DP-Adam under DP) [preset]")
]
PatchSize = Annotated[
    str | None,
    typer.Option(
        help="segmentation: train on XxYxZ-voxel patches, a study's patches clipped as one DP sample "
        "(e.g. 16x16x12; empty: whole volumes) ['']"
    ),
]
PatchesPerStudy = Annotated[int | None, typer.Option(help="with --patch-size: patches per sampled study a step [4]")]
WeightDecay = Annotated[float | None, typer.Option(help="local L2 weight decay [preset]")]
Hospitals = Annotated[int | None, typer.Option(help="generated datasets: how many hospitals [preset]")]
MinHospitals = Annotated[int | None, typer.Option(help="stop when fewer hospitals can train [2]")]
ImageSize = Annotated[int | None, typer.Option(help="images: resize to this many pixels a side [64]")]
Seed = Annotated[
    int | None,
    typer.Option(
        help="seed for model initialisation and generated hospitals' data [0] "
        "(DP noise and sampling never come from it)"
    ),
]
Policy = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="give every simulated hospital the [privacy] "
        "policy of this hospital.toml (default: hospitals accept the run)",
    ),
]
ReproducibleNoise = Annotated[
    bool,
    typer.Option(
        "--reproducible-noise",
        help="benchmarks only: key every hospital's DP noise from --seed; the results are marked NOT private",
    ),
]
OutputDir = Annotated[Path, typer.Option(help="where the model, results.json and plots go")]
LedgerDir = Annotated[
    Path | None,
    typer.Option(
        help="hospitals' privacy ledgers (default: OUTPUT_DIR/ledgers); reuse it to accumulate epsilon across runs"
    ),
]
DataRoot = Annotated[
    Path | None,
    typer.Option(
        help="hospital folders (hospital-0, hospital-1, ...): written/reused for generated datasets (default: "
        "runs/data/DATASET); required for ehr-table / ehr-events"
    ),
]
HiddenUnits = Annotated[int | None, typer.Option(help="MLP width [32]")]
ProximalMu = Annotated[
    float | None, typer.Option(help=f"fedprox: weight of the proximal term [{RUN_DEFAULTS['proximal_mu']:g}]")
]
ServerLearningRate = Annotated[
    float | None, typer.Option(help=f"fedadam: the server's step size [{RUN_DEFAULTS['server_learning_rate']:g}]")
]
MaxGradNorm = Annotated[
    float | None, typer.Option(help=f"DP-SGD: per-example gradient clipping norm [{RUN_DEFAULTS['max_grad_norm']:g}]")
]
StatsBudgetFraction = Annotated[
    float | None,
    typer.Option(
        help="DP: share of the run's epsilon the feature-statistics round spends "
        f"[{RUN_DEFAULTS['stats_budget_fraction']:g}]"
    ),
]
SecaggThreshold = Annotated[
    int | None, typer.Option(help="secure aggregation: fewest hospitals a round can finish with [0: a strict majority]")
]
SecaggClipRange = Annotated[
    float | None,
    typer.Option(
        help="secure aggregation: each update value is clipped at the hospital into [-R, R] "
        f"[{RUN_DEFAULTS['secagg_clip_range']:g}]"
    ),
]
LocalBaseline = Annotated[
    bool, typer.Option("--local-baseline/--no-local-baseline", help="also train each hospital alone, for comparison")
]
Resume = Annotated[
    bool, typer.Option("--resume", help="continue the run checkpointed in OUTPUT_DIR from its last completed round")
]
PooledBaseline = Annotated[
    bool,
    typer.Option(
        "--pooled-baseline/--no-pooled-baseline",
        help="also train one model on all hospitals' rows pooled (the central reference; simulation only)",
    ),
]
Verbose = Annotated[bool, typer.Option(help="show Flower's own log")]
