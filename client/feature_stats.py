"""The hospital's half of the federated statistics round: noisy feature sums, never rows.

Each numeric feature is first clipped to its public range and mapped to u in [-0.5, 0.5]; a
patient then contributes (u_1..u_d), whose L2 norm is at most sqrt(d/4). Gaussian noise with
that sensitivity times the noise multiplier makes the release (epsilon, delta)-DP; the ledger
counts it as one sampled-Gaussian step with rate 1. The count is not part of the release: the
server divides by the hospital's public training size (its DP step count times the batch size,
which Opacus's sample rate already makes public). Second moments are not released either: at
tens to hundreds of patients they drown in the noise, so the scale comes from the public range
(see server/feature_statistics.py).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from client.secret_randomness import SecretRandom
from fedcare.errors import FedcareError


def stats_key(feature_names: list[str], bounds: dict[str, tuple[float, float]], fingerprint: str) -> str:
    """Identifies a statistics query on one version of the data, so an identical later query on the
    same data re-sends the paid-for answer (changed data is a new release, and is charged)."""
    payload = json.dumps({"features": feature_names, "bounds": bounds, "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def sensitivity(n_features: int) -> float:
    return math.sqrt(0.25 * n_features)


def scaled(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip(x, lo, hi) - lo) / (hi - lo) - 0.5


def local_sums(values: np.ndarray, bounds: list[tuple[float, float]],
               noise_multiplier: float | None, rng: SecretRandom | None) -> dict[str, list[float]]:
    """sum(u) per feature over patients (one row each), with Gaussian noise unless ``noise_multiplier`` is None.

    The noise comes from ``rng``, the hospital's secret stream (OS entropy): never from a seed a
    message carries, which would let the coordinator subtract it.

    A missing value (NaN) contributes u = 0, the middle of the public range: the patient's
    contribution stays bounded, at the price of pulling that feature's mean towards the middle
    in proportion to how often it is missing.
    """
    if len(values) == 0:
        raise FedcareError("cannot compute feature statistics on an empty training set")
    if values.shape[1] == 0:
        return {"sum": []}
    u = np.stack([scaled(values[:, j].astype(float), lo, hi) for j, (lo, hi) in enumerate(bounds)], axis=1)
    s1 = np.nan_to_num(u, nan=0.0).sum(axis=0)
    if noise_multiplier is not None:
        if rng is None:
            raise ValueError("a noisy statistics release needs the hospital's secret stream")
        s1 = s1 + rng.standard_normal(s1.size) * (noise_multiplier * sensitivity(len(bounds)))
    return {"sum": s1.tolist()}
