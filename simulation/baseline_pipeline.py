"""The federation's pipeline, for the baselines: the same model and the same clipping and
standardisation rule, from exact sums instead of noisy ones.

Local-only and pooled-trained baselines used to standardise with the real mean and standard
deviation of their rows, so a comparison set two pipelines against each other. Here they go
through the statistics round's own code (client/feature_stats.py for the sums,
server/feature_statistics.py for the centre and scale) without its noise: the baselines never
release anything, so they need none, and the comparison is federation against isolation.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from client.datasets import HospitalData
from client.feature_stats import local_sums
from fedcare.run_config import RunSettings
from server.feature_statistics import HospitalSums, pooled_normalisation
from shared_models.registry import build_model, resolve_model


def baseline_model(s: RunSettings, data: HospitalData) -> nn.Module:
    """The run's model for ``data``, initialised from the run's seed as the federation's is (a U-Net
    trained on patches predicts whole volumes window by window, as at the hospitals)."""
    patches = s.patch_plan()
    torch.manual_seed(s.seed)
    return build_model(
        resolve_model(s.model, data.task),
        data.input_shape,
        s.hidden_units,
        patch=patches.size if patches is not None else None,
    )


def federation_normalisation(hospitals: list[HospitalData]) -> tuple[list[float], list[float]]:
    """Mean and scale of the numeric features over ``hospitals``' training patients, by the
    statistics round's rule (one hospital: that hospital's own)."""
    first = hospitals[0]
    bounds = first.numeric_bounds()
    replies = []
    for h in hospitals:
        v = local_sums(h.per_patient_numeric(h.x_train), bounds, None, None)
        replies.append(
            HospitalSums(
                float(len(h.y_train)),
                cast(list[float], v["sum"]),
                cast(list[float], v["second"]),
                cast(list[float], v["observed"]),
            )
        )
    norm = pooled_normalisation(list(first.numeric_features), bounds, replies)
    return norm.mean, norm.std
