"""The hospital's half of the federated statistics round: noisy feature sums, never rows.

Each numeric feature is clipped to its public range and mapped to u in [-1/2, 1/2]. A patient
then contributes, per feature j, three bounded numbers (all 0 where the value is missing):

* ``u_j``                    the value, |u_j| <= 1/2            -> the pooled mean;
* ``2 (u_j^2 - 1/8)``        the second moment, |.| <= 1/4      -> the pooled standard deviation;
* ``1/2`` if observed        the observed count, in [0, 1/2]    -> the missing-value correction.

The L2 norm of one patient's 3d numbers is at most ``sqrt(9 d / 16)``; Gaussian noise with that
sensitivity times the noise multiplier makes the whole release one (epsilon, delta)-DP Gaussian
mechanism, which the ledger counts as one sampled-Gaussian step with rate 1. Of the squared
sensitivity, the means and the observed counts take 4/9 each and the second moments 1/9 (their
range is a quarter of the others'). The patient count itself is not released: the server divides
by the observed counts, and weights hospitals by their public training size.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from client.secret_randomness import SecretRandom
from fedcare.errors import FedcareError
from fedcare.wire import STATS_OBSERVED_WEIGHT as OBSERVED_WEIGHT
from fedcare.wire import STATS_SECOND_WEIGHT as SECOND_WEIGHT

# the release's format: part of the query key, so an answer paid for in another format is not re-sent
RELEASE_FORMAT = "sum+second+observed/v2"


def stats_key(feature_names: list[str], bounds: dict[str, tuple[float, float]], fingerprint: str) -> str:
    """Identifies a statistics query on one version of the data, so an identical later query on the
    same data re-sends the paid-for answer (changed data is a new release, and is charged)."""
    payload = json.dumps(
        {"features": feature_names, "bounds": bounds, "data": fingerprint, "format": RELEASE_FORMAT}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def sensitivity(n_features: int) -> float:
    """L2 bound of one patient's contribution: sqrt(d (1/4 + 1/16 + 1/4))."""
    return math.sqrt(n_features * (0.25 + 0.0625 + 0.25))


def scaled(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip(x, lo, hi) - lo) / (hi - lo) - 0.5


def contributions(values: np.ndarray, bounds: list[tuple[float, float]]) -> np.ndarray:
    """Each patient's (n, 3d) bounded contribution: u, second moment, observed (0 where missing)."""
    u = np.stack([scaled(values[:, j].astype(float), lo, hi) for j, (lo, hi) in enumerate(bounds)], axis=1)
    observed = ~np.isnan(u)
    u = np.where(observed, u, 0.0)
    second = np.where(observed, SECOND_WEIGHT * (u * u - 0.125), 0.0)
    return np.concatenate([u, second, OBSERVED_WEIGHT * observed], axis=1)


def local_sums(
    values: np.ndarray, bounds: list[tuple[float, float]], noise_multiplier: float | None, rng: SecretRandom | None
) -> dict[str, list[float] | float]:
    """The release: per-feature sums of the three components, with Gaussian noise unless
    ``noise_multiplier`` is None; ``noise_std`` says how much noise each sum carries (public: it
    follows from the noise multiplier the hospital's audit log records).

    The noise comes from ``rng``, the hospital's secret stream (OS entropy): never from a seed a
    message carries, which would let the coordinator subtract it.
    """
    if len(values) == 0:
        raise FedcareError("cannot compute feature statistics on an empty training set")
    d = values.shape[1]
    if d == 0:
        return {"sum": [], "second": [], "observed": [], "noise_std": 0.0}
    totals = contributions(values, bounds).sum(axis=0)
    noise_std = 0.0
    if noise_multiplier is not None:
        if rng is None:
            raise ValueError("a noisy statistics release needs the hospital's secret stream")
        noise_std = noise_multiplier * sensitivity(d)
        totals = totals + rng.standard_normal(totals.size) * noise_std
    return {
        "sum": totals[:d].tolist(),
        "second": totals[d : 2 * d].tolist(),
        "observed": totals[2 * d :].tolist(),
        "noise_std": float(noise_std),
    }


def released_arrays(values: dict[str, list[float] | float]) -> dict[str, np.ndarray]:
    """What the audit log digests as sent (an empty release stays ``{"sum": []}``)."""
    if not values["sum"]:
        return {"sum": np.asarray([], dtype=np.float64)}
    return {key: np.asarray(values[key], dtype=np.float64) for key in ("sum", "second", "observed")}
