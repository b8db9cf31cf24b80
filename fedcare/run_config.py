"""Run settings shared by the ServerApp, the ClientApp and the CLI: names, defaults, checks.

The defaults here are the single source of truth; ``[tool.flwr.app.config]`` in pyproject.toml
mirrors them for ``flwr run`` (a test keeps both identical).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from fedcare.config_values import typed
from fedcare.dataset_registry import (
    DATASET_NAMES,
    LEARNING_TASKS,
    REGISTRY,
    SEGMENTABLE,
    dataset_spec,
    model_input_kind,
)
from fedcare.errors import FedcareError

# derived from the dataset registry (fedcare/dataset_registry.py), the one place dataset facts live
DATASET_TASKS = {name: spec.task for name, spec in REGISTRY.items()}  # which models can train on it
DATASETS = DATASET_NAMES
MODELS = ("auto", "logistic", "mlp", "cnn", "gru", "cnn3d", "densenet3d", "unet3d")
# personalise-lr-scale 0 (the default) means this multiple, by whether the run has DP: measured over
# five real multi-site tables (docs/benchmarks.md), gentler fine-tuning pays under DP noise (at
# epsilon 1 on the tables with signal, nmes1988's personalised AUC 0.604 at 1.0, 0.636-0.647 at 0.3,
# against local-only 0.621) and costs without it (a hospital below local-only on 2 tables at 0.3)
AUTO_PERSONALISE_LR_SCALE = {True: 0.3, False: 1.0}
LOCAL_OPTIMIZERS = ("sgd", "adam")  # the hospitals' local steps; under DP both step on the noisy gradient
STRATEGIES = ("fedavg", "fedprox", "fedadam")
# Per-dataset starting points (measured in bench/; see docs/benchmarks.md). `fedcare simulate`
# applies them under whatever the user passes; `flwr run` users pass them as run config.
DATASET_PRESETS: dict[str, dict[str, Any]] = {name: dict(spec.preset) for name, spec in REGISTRY.items()}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a run is configured by. Field names map to run-config keys (``_`` -> ``-``)."""

    dataset: str = "fed-heart-disease"
    task: str = "classify"  # classify: a label per patient; segment: a lesion mask per volume (volume data)
    model: str = "auto"  # the data's default: logistic (tables), gru (sequences), cnn (images), cnn3d / unet3d
    hidden_units: int = 32  # MLP width
    strategy: str = "fedavg"
    num_rounds: int = 15
    local_epochs: int = 1
    personalise_rounds: int = 2  # rounds of local fine-tuning of the final model at each hospital (DP, charged)
    personalise_lr_scale: float = 0.0  # fine-tuning's rate = this x learning-rate (0: AUTO_PERSONALISE_LR_SCALE)
    batch_size: int = 30
    learning_rate: float = 0.3
    local_optimizer: str = "sgd"  # sgd | adam (DP-SGD / DP-Adam under DP: the same clipped, noised gradient)
    patch_size: str = ""  # segment: train on XxYxZ-voxel patches, a study's patches one DP sample ("": whole volumes)
    patches_per_study: int = 4  # patches cut from each sampled study per step (with patch-size)
    weight_decay: float = 0.0  # chosen over real multi-site tables (docs/benchmarks.md), not one dataset
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.1
    dp: bool = True
    target_epsilon: float = 1.0
    delta: float = 1e-4
    max_grad_norm: float = 1.0
    stats_budget_fraction: float = 0.1
    secure_aggregation: bool = True  # masked updates: the server learns only each round's weighted mean
    secagg_threshold: int = 0  # fewest hospitals a secure round can finish with (0: a strict majority)
    secagg_clip_range: float = 10.0  # |update - global model| per value must stay below this (quantisation)
    hospitals: int = 4  # how many hospital nodes the run waits for
    min_hospitals: int = 2  # stop cleanly when fewer can still train
    seed: int = 0
    image_size: int = 64  # images are resized to image_size x image_size before training
    data_root: str = ""  # generated datasets: where `fedcare data prepare` wrote the hospitals
    resume: bool = False  # continue the run checkpointed in output_dir from its last completed round
    output_dir: str = "fedcare-runs/latest"
    ledger_dir: str = "fedcare-ledgers"

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Build from a Flower run config (dash-separated keys); unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise FedcareError(
                    f"unknown run-config key '{key}'",
                    f"known keys: {', '.join(k.replace('_', '-') for k in fields)}",
                )
            values[name] = _coerce(key, value, fields[name].type)
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        """Dash-separated run-config dict (what ``flwr run --run-config`` would carry)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)

    def patch_plan(self) -> PatchPlan | None:
        """The patches a segmentation step trains on; None: whole volumes."""
        return PatchPlan.parse(self.patch_size, self.patches_per_study)

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> RunSettings:
        """The dataset's preset under explicit ``overrides`` (None values mean "not given")."""
        given = {k: v for k, v in overrides.items() if v is not None}
        values = dataset_spec(dataset).preset_for(given.get("task", "classify")) | given
        return cls(dataset=dataset, **values)


# the defaults above by field name, for help texts (without building RunSettings)
RUN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RunSettings)}

# `fedcare simulate` options not spelled --<run-config key> (every other setting's option is)
SIMULATE_OPTIONS = {
    "num_rounds": "--rounds",
    "target_epsilon": "--epsilon",
    "dp": "--dp/--no-dp",
    "secure_aggregation": "--secure-aggregation/--no-secure-aggregation",
}


def simulate_option(name: str) -> str:
    """The `fedcare simulate` option that sets RunSettings field ``name``."""
    return SIMULATE_OPTIONS.get(name, "--" + name.replace("_", "-"))


def how_to_set(name: str) -> str:
    """Where a user changes run setting ``name``, for a hint: the simulate option and the run-config
    key of a deployed run (``flwr run --run-config``), so one hint serves both."""
    return f"`fedcare simulate {simulate_option(name)}`, or run-config {name.replace('_', '-')} in a deployed run"


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    kind = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        return typed(value, kind)
    except ValueError:
        raise FedcareError(f"run-config '{key}' must be a {kind}, got {value!r}", "fix the value") from None


def validate(s: RunSettings) -> None:
    """Reject settings that cannot run, with a one-line reason and a fix."""
    data_kind = dataset_spec(s.dataset).task
    _validate_task(s.task, data_kind)
    if s.patch_plan() is not None and s.task != "segment":
        raise FedcareError(
            f"patch-size {s.patch_size} is for segmentation (a patch of a study keeps its mask, not its label)",
            f"train task segment, or leave patch-size empty ({how_to_set('patch_size')})",
        )
    if s.model not in MODELS:
        raise FedcareError(f"unknown model '{s.model}'", f"choose one of: {', '.join(MODELS)} ({how_to_set('model')})")
    from shared_models.registry import resolve_model

    resolve_model(s.model, model_input_kind(data_kind, s.task))
    if s.local_optimizer not in LOCAL_OPTIMIZERS:
        raise FedcareError(
            f"unknown local optimizer '{s.local_optimizer}'",
            f"choose one of: {', '.join(LOCAL_OPTIMIZERS)} ({how_to_set('local_optimizer')})",
        )
    if s.strategy not in STRATEGIES:
        raise FedcareError(
            f"unknown strategy '{s.strategy}'", f"choose one of: {', '.join(STRATEGIES)} ({how_to_set('strategy')})"
        )
    if s.personalise_rounds < 0:
        raise FedcareError(
            f"personalise-rounds must be 0 or more, got {s.personalise_rounds}",
            f"set it with {how_to_set('personalise_rounds')}",
        )
    for name in (
        "num_rounds",
        "local_epochs",
        "batch_size",
        "hospitals",
        "min_hospitals",
        "image_size",
        "hidden_units",
    ):
        if getattr(s, name) < 1:
            raise FedcareError(
                f"{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}",
                f"set a whole number >= 1 with {how_to_set(name)}",
            )
    if s.secagg_threshold < 0:
        raise FedcareError(
            f"secagg-threshold must be >= 0 (0 = a strict majority), got {s.secagg_threshold}",
            f"set it with {how_to_set('secagg_threshold')}",
        )
    for name in ("learning_rate", "server_learning_rate", "max_grad_norm", "secagg_clip_range"):
        value = getattr(s, name)
        if not (value > 0 and math.isfinite(value)):
            raise FedcareError(
                f"{name.replace('_', '-')} must be > 0, got {value}", f"set a positive number with {how_to_set(name)}"
            )
    for name in ("proximal_mu", "weight_decay", "personalise_lr_scale"):
        if getattr(s, name) < 0:
            raise FedcareError(
                f"{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}", f"set it with {how_to_set(name)}"
            )
    if s.dp:
        _validate_dp(s)


_PATCH_SIDES = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class PatchPlan:
    """Patch-based 3D training: patch side lengths in voxels (x, y, z) and how many patches each
    sampled study gives a step (``client/volume_patches.py`` cuts them)."""

    size: tuple[int, int, int]
    per_study: int

    @classmethod
    def parse(cls, size: str, per_study: int) -> PatchPlan | None:
        """``"XxYxZ"`` voxels and a patch count; ``""`` (whole volumes) gives None."""
        if not size.strip():
            return None
        match = _PATCH_SIDES.match(size)
        if match is None:
            raise FedcareError(
                f"patch-size must be three voxel counts like 16x16x12, got '{size}'",
                f"set patch-size to XxYxZ, or leave it empty to train on whole volumes ({how_to_set('patch_size')})",
            )
        x, y, z = (int(v) for v in match.groups())
        if min(x, y, z) < 1 or per_study < 1:
            raise FedcareError(
                f"patch-size {size} with patches-per-study {per_study}: every side and the count must be >= 1",
                f"set positive patch sides and at least one patch per study ({how_to_set('patches_per_study')})",
            )
        return cls((x, y, z), int(per_study))

    def check_fits(self, spatial: tuple[int, ...]) -> None:
        """Refuse a patch larger than the volumes it is cut from."""
        if len(spatial) != 3 or any(p > v for p, v in zip(self.size, spatial)):
            raise FedcareError(
                f"patch-size {'x'.join(map(str, self.size))} does not fit in volumes of "
                f"{'x'.join(map(str, spatial))} voxels",
                f"choose a patch no larger than the volume policy's size ({how_to_set('patch_size')})",
            )


def personalise_lr_scale(scale: float, dp: bool) -> float:
    """Personalisation's learning rate as a multiple of learning-rate: ``scale``, or for 0 (the
    default) ``AUTO_PERSONALISE_LR_SCALE`` by whether the run has DP."""
    return scale if scale > 0 else AUTO_PERSONALISE_LR_SCALE[dp]


def _validate_task(task: str, data_kind: str) -> None:
    """classify on any data; segment only where the data can carry masks (volumes)."""
    if task not in LEARNING_TASKS:
        raise FedcareError(
            f"unknown task '{task}'", f"choose one of: {', '.join(LEARNING_TASKS)} ({how_to_set('task')})"
        )
    if task == "segment" and data_kind not in SEGMENTABLE:
        raise FedcareError(
            f"task 'segment' needs volume data with segmentation masks; this dataset is {data_kind} data",
            f"use task classify, or a volume dataset (synthetic-ct, dicom-series) ({how_to_set('task')})",
        )


def _validate_dp(s: RunSettings) -> None:
    """The DP settings: a positive finite epsilon, delta and the statistics' share in (0, 1)."""
    if not (s.target_epsilon > 0 and math.isfinite(s.target_epsilon)):
        raise FedcareError(
            f"target epsilon must be > 0, got {s.target_epsilon}",
            f"pass a positive epsilon, e.g. 1.0 ({how_to_set('target_epsilon')}), or train without DP "
            "(`fedcare simulate --no-dp`, or run-config dp=false in a deployed run)",
        )
    if not (0 < s.delta < 1):
        raise FedcareError(
            f"delta must be in (0, 1), got {s.delta}",
            f"use a delta well below 1/n, e.g. 1e-4 ({how_to_set('delta')})",
        )
    if not (0 < s.stats_budget_fraction < 1):
        raise FedcareError(
            f"stats-budget-fraction must be in (0, 1), got {s.stats_budget_fraction}",
            f"set the share of epsilon the feature-statistics round spends, e.g. 0.1, with "
            f"{how_to_set('stats_budget_fraction')}",
        )
