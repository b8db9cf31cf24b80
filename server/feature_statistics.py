"""The coordinator's half of the statistics round: pooled mean/std from hospitals' sums.

Inputs are noisy (DP) counts and sums of each numeric feature mapped to [-0.5, 0.5] within its
public range; the output is a standardisation every hospital applies identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcare.errors import FedcareError

# Never trust a (noisy) std below this fraction of the public range, so noise cannot blow a
# feature up by orders of magnitude.
MIN_STD_FRACTION = 0.05


@dataclass
class Normalisation:
    features: list[str]
    mean: list[float]
    std: list[float]
    pooled_count: float


def pooled_normalisation(features: list[str], bounds: list[tuple[float, float]],
                         replies: list[dict[str, list[float]]]) -> Normalisation:
    """Mean and std per feature in original units from per-hospital (count, sum, sum_sq)."""
    if not replies:
        raise FedcareError("no hospital answered the statistics round", "check that the nodes are running")
    count = sum(r["count"][0] for r in replies)
    s1 = np.sum([r["sum"] for r in replies], axis=0)
    s2 = np.sum([r["sum_sq"] for r in replies], axis=0)
    if count < 2:
        raise FedcareError(f"the statistics round counted {count:.1f} patients in total; too few to normalise")
    mean_u = np.clip(s1 / count, -0.5, 0.5)
    var_u = np.maximum(s2 / count - mean_u**2, MIN_STD_FRACTION**2)
    lo = np.array([b[0] for b in bounds])
    width = np.array([b[1] - b[0] for b in bounds])
    mean = lo + (mean_u + 0.5) * width
    std = np.sqrt(var_u) * width
    return Normalisation(list(features), mean.tolist(), std.tolist(), float(count))
