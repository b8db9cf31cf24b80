"""The coordinator's half of the statistics round: a shared standardisation from hospitals' sums.

Inputs are each hospital's noisy (DP) sums of its numeric features mapped to [-0.5, 0.5] within
their public ranges, and its public training size. The centre is the pooled mean; the scale is a
quarter of the public range. Noisy second moments were tried and lost accuracy under DP
(variance estimates from a few hundred patients drown in the noise); the public scale gave the
same accuracy as exact pooled standard deviations without DP (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcare.errors import FedcareError

PUBLIC_SCALE_FRACTION = 0.25  # scale = this fraction of a feature's public range


@dataclass
class Normalisation:
    features: list[str]
    mean: list[float]
    std: list[float]
    pooled_count: float


def pooled_normalisation(features: list[str], bounds: list[tuple[float, float]],
                         replies: list[dict[str, list[float]]]) -> Normalisation:
    """Centre and scale per feature in original units from per-hospital ``{"count", "sum"}``."""
    if not replies:
        raise FedcareError("no hospital answered the statistics round", "check that the nodes are running")
    count = sum(r["count"] for r in replies)
    s1 = np.sum([r["sum"] for r in replies], axis=0)
    if count < 2:
        raise FedcareError(f"the statistics round counted {count:.1f} patients in total; too few to normalise")
    mean_u = np.clip(s1 / count, -0.5, 0.5)
    lo = np.array([b[0] for b in bounds])
    width = np.array([b[1] - b[0] for b in bounds])
    mean = lo + (mean_u + 0.5) * width
    std = PUBLIC_SCALE_FRACTION * width
    return Normalisation(list(features), mean.tolist(), std.tolist(), float(count))
