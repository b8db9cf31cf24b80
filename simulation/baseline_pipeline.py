"""The federation's preprocessing, for the baselines: the same clipping and standardisation rule,
from exact sums instead of noisy ones.

Local-only and pooled-trained baselines used to standardise with the real mean and standard
deviation of their rows, so a comparison set two pipelines against each other. Here they go
through the statistics round's own code (client/feature_stats.py for the sums,
server/feature_statistics.py for the centre and scale) without its noise: the baselines never
release anything, so they need none, and the comparison is federation against isolation.
"""

from __future__ import annotations

from typing import cast

from client.datasets import HospitalData
from client.feature_stats import local_sums
from server.feature_statistics import HospitalSums, pooled_normalisation


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
