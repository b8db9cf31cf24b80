"""Build a model by name, so server and hospitals instantiate the same architecture.

Each model says which input kind it trains on; ``input_shape`` is one sample's shape as the
statistics round reports it: (d,) for tables, (T, d + 1) for masked sequences, (C, S, S) for images,
(C, X, Y, Z) for volumes (classified, or segmented voxel by voxel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedcare.errors import FedcareError

if TYPE_CHECKING:  # torch is imported only when a model is built: run-config checks stay light
    from torch import nn

MODEL_TASKS = {
    "logistic": "tabular",
    "mlp": "tabular",
    "cnn": "image",
    "gru": "sequence",
    "cnn3d": "volume",
    "densenet3d": "volume",
    "unet3d": "segmentation",  # volumes with lesion masks (run task "segment")
}
DEFAULT_MODEL = {"tabular": "logistic", "image": "cnn", "sequence": "gru", "volume": "cnn3d", "segmentation": "unet3d"}


def resolve_model(name: str, task: str) -> str:
    """``auto`` -> the task's default model; otherwise check the model fits the task."""
    if name == "auto":
        return DEFAULT_MODEL[task]
    if name not in MODEL_TASKS:
        raise FedcareError(f"unknown model '{name}'", f"choose one of: auto, {', '.join(sorted(MODEL_TASKS))}")
    if MODEL_TASKS[name] != task:
        fits = sorted(m for m, t in MODEL_TASKS.items() if t == task)
        raise FedcareError(
            f"model '{name}' trains on {MODEL_TASKS[name]} data, but this dataset is {task} data",
            f"use model {' or '.join(['auto', *fits])} (`fedcare simulate --model`, or run-config model)",
        )
    return name


def build_model(
    name: str, input_shape: int | Sequence[int], hidden_units: int = 32, patch: Sequence[int] | None = None
) -> nn.Module:
    """A freshly initialised model (seed torch first for reproducible weights).

    ``hidden_units`` sets the MLP's width (the other models have a fixed size). ``patch``: the
    patch size a U-Net trains on (it then predicts whole volumes window by window); the same
    parameters whatever it is, so the server builds the model without it.
    """
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(v) for v in input_shape)
    if name in ("logistic", "mlp"):
        from shared_models.tabular import MLP, LogisticRegression

        _expect(name, shape, 1, "(features,)")
        return LogisticRegression(shape[0]) if name == "logistic" else MLP(shape[0], hidden=hidden_units)
    if name == "cnn":
        from shared_models.imaging_cnn import SmallCNN

        _expect(name, shape, 3, "(channels, size, size)")
        return SmallCNN(image_size=shape[-1], channels=shape[0])
    if name == "cnn3d":
        from shared_models.volume_cnn import VolumeCNN

        _expect(name, shape, 4, "(channels, x, y, z)")
        return VolumeCNN(channels=shape[0], spatial=shape[1:])
    if name == "densenet3d":
        from shared_models.volume_densenet import VolumeDenseNet

        _expect(name, shape, 4, "(channels, x, y, z)")
        return VolumeDenseNet(channels=shape[0], spatial=shape[1:])
    if name == "unet3d":
        from shared_models.volume_unet import VolumeUNet

        _expect(name, shape, 4, "(channels, x, y, z)")
        return VolumeUNet(channels=shape[0], spatial=shape[1:], patch=patch)
    if name == "gru":
        from shared_models.sequence_gru import SequenceGRU

        _expect(name, shape, 2, "(steps, features + mask)")
        return SequenceGRU(shape[-1] - 1)
    raise FedcareError(f"unknown model '{name}'", f"choose one of: {', '.join(sorted(MODEL_TASKS))}")


def _expect(name: str, shape: tuple[int, ...], rank: int, what: str) -> None:
    if len(shape) != rank:
        raise FedcareError(
            f"model '{name}' needs inputs shaped {what}, got {shape}",
            "pick the model that matches the dataset (or --model auto)",
        )
