"""The coordinator's half of the statistics round: a shared standardisation from hospitals' sums.

Inputs are each hospital's (noisy, with DP) per-feature sums of u (the value clipped to its
public range and mapped to [-1/2, 1/2]), of its second moment and of its observed count (see
client/feature_stats.py), plus the hospital's public training size. Per feature:

* the centre is the mean of the *observed* values (sum of u over the observed count), so a
  column with missing values is not pulled towards the middle of its range;
* the scale is the pooled standard deviation of the observed values, never below what the noise
  lets the federation resolve: with DP at a few hundred patients a variance estimate can be
  mostly noise, and dividing by a noise-sized standard deviation would blow a feature up. The
  floor is the standard error of the second-moment estimate (in u units), so a feature whose
  spread the noise hides gets a scale near the range's (as before), and one whose spread the
  release measures gets its real one. Without DP the scale is the exact pooled standard deviation.

The same function standardises the local-only and pooled-trained baselines (from exact sums), so
a comparison is between federation and isolation, not between two preprocessing pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcare.errors import FedcareError
from fedcare.wire import STATS_OBSERVED_WEIGHT as OBSERVED_WEIGHT
from fedcare.wire import STATS_SECOND_WEIGHT as SECOND_WEIGHT

MIN_SCALE_FRACTION = 1e-3  # a feature constant everywhere: scale 0.1 % of its range, not zero
MAX_SCALE_FRACTION = 0.5  # no variable within its range has a larger standard deviation


@dataclass
class Normalisation:
    features: list[str]
    mean: list[float]
    std: list[float]
    pooled_count: float


@dataclass(frozen=True)
class HospitalSums:
    """One hospital's statistics release as the server pools it."""

    count: float  # public training size
    sum: Sequence[float]
    second: Sequence[float]
    observed: Sequence[float]
    noise_std: float = 0.0  # standard deviation of the noise on each sum


def pooled_normalisation(
    features: list[str], bounds: list[tuple[float, float]], replies: list[HospitalSums]
) -> Normalisation:
    """Centre and scale per feature, in original units, from per-hospital sums."""
    if not replies:
        raise FedcareError("no hospital answered the statistics round", "check that the nodes are running")
    count = float(sum(r.count for r in replies))
    if count < 2:
        raise FedcareError(f"the statistics round counted {count:.1f} patients in total; too few to normalise")
    if not features:
        return Normalisation([], [], [], count)
    s1, s2, so = (
        np.sum([np.asarray(getattr(r, k), dtype=float) for r in replies], axis=0) for k in ("sum", "second", "observed")
    )
    noise_sd = float(np.sqrt(sum(r.noise_std**2 for r in replies)))
    observed = np.clip(so / OBSERVED_WEIGHT, 1.0, count)
    mean_u = np.clip(s1 / observed, -0.5, 0.5)
    second_u = s2 / SECOND_WEIGHT / observed + 0.125
    variance_floor = noise_sd / SECOND_WEIGHT / observed  # standard error of the second moment
    var_u = np.maximum(second_u - mean_u**2, np.maximum(variance_floor, MIN_SCALE_FRACTION**2))
    sd_u = np.minimum(np.sqrt(var_u), MAX_SCALE_FRACTION)
    lo = np.array([b[0] for b in bounds], dtype=float)
    width = np.array([b[1] - b[0] for b in bounds], dtype=float)
    return Normalisation(list(features), (lo + (mean_u + 0.5) * width).tolist(), (sd_u * width).tolist(), count)
