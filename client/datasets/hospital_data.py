"""One hospital's local data as the trainer consumes it, plus its privacy-ledger fingerprint.

Three kinds of input share this container, so the statistics round, the trainer and the ledger
treat them alike:

- ``tabular``: x is (n, d) encoded features;
- ``sequence``: x is (n, T, d + 1), left-padded per-patient event sequences whose last channel is
  the mask (1 = real step), so the latest event is always the last step;
- ``image``: x is (n, C, S, S) pixels already windowed into [0, 1] by the DICOM reader;
- ``volume``: x is (n, 1, X, Y, Z) CT/MR volumes resampled and windowed into [0, 1];
- ``segmentation``: the same volumes, with y a (n, 1, X, Y, Z) 0/1 lesion mask instead of a label.

Numeric features (tabular columns, sequence step channels) are clipped to their public ranges and
standardised with the federation's agreed mean and scale; missing values arrive as NaN and land on the pooled mean (0 after
standardisation), next to a missing-indicator feature where the schema asks for one.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from fedcare.errors import FedcareError

TASKS = ("tabular", "sequence", "image", "volume", "segmentation")
PIXEL_TASKS = ("image", "volume", "segmentation")  # inputs already scaled into [0, 1]: no feature statistics


@dataclass
class HospitalData:
    """Encoded inputs (float32) and binary labels, split into train and test."""

    name: str
    feature_names: list[str]  # model input features (step features for sequences; [] for images)
    numeric_features: list[str]  # those the statistics round standardises
    feature_bounds: dict[str, tuple[float, float]]  # public plausible ranges of the numeric features
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str = "tabular"
    notes: list[str] = field(default_factory=list)  # what the loader reported (no patient values)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: what server and hospitals build the model for."""
        return tuple(int(v) for v in self.x_train.shape[1:])

    def numeric_columns(self) -> list[int]:
        return [self.feature_names.index(f) for f in self.numeric_features]

    def numeric_bounds(self) -> list[tuple[float, float]]:
        return [cast(tuple[float, float], tuple(self.feature_bounds[f])) for f in self.numeric_features]

    def per_patient_numeric(self, x: np.ndarray) -> np.ndarray:
        """One row per patient of numeric features, NaN where missing: what the statistics round sums.

        A sequence patient contributes the mean over their real steps, so each patient's
        contribution stays one bounded vector whatever the number of visits.
        """
        cols = self.numeric_columns()
        if self.task == "tabular":
            return x[:, cols].astype(float)
        if self.task == "sequence":
            mask = x[..., -1:] > 0
            steps = np.where(mask, x[..., cols], np.nan)
            with warnings.catch_warnings():  # a feature missing at every step stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(steps, axis=1)
        return np.zeros((len(x), 0))

    def prepared(self, x: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
        """Model input: numeric features clipped to their public ranges (as the statistics round clips
        them, the same at every hospital), standardised with the agreed mean/std, NaN -> pooled mean.

        Clipping keeps an impossible value (an age of 65,526) from training as it is: it would
        dominate its patient's gradient and can push an update outside the secure-aggregation range.
        """
        if self.task in PIXEL_TASKS or not self.numeric_features:
            return x.astype(np.float32, copy=False)
        cols = self.numeric_columns()
        out = x.astype(np.float32, copy=True)
        bounds = np.asarray(self.numeric_bounds(), dtype=np.float32)
        mu = np.asarray(mean, dtype=np.float32)
        sd = np.asarray(std, dtype=np.float32)
        clipped = np.clip(out[..., cols], bounds[:, 0], bounds[:, 1])  # NaN stays NaN
        out[..., cols] = np.nan_to_num((clipped - mu) / sd, nan=0.0)
        if self.task == "sequence":
            out[..., :-1] *= out[..., -1:]  # padding stays exactly zero
        return out

    def fingerprint(self) -> str:
        """SHA-256 of the training data: the privacy ledger is keyed by it (no patient data)."""
        h = hashlib.sha256()
        h.update(self.task.encode())
        h.update(",".join(self.feature_names).encode())
        h.update(repr(self.input_shape).encode())
        h.update(np.ascontiguousarray(self.x_train, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.y_train, dtype=np.int64).tobytes())
        return h.hexdigest()

    def check_trainable(self, batch_size: int, dp: bool = True) -> None:
        """Refuse data that cannot train a model: too few rows or non-finite inputs.

        A hospital whose training labels are all one class still helps a federation (real
        Fed-Heart-Disease: Switzerland), so that is not an error here. NaN is allowed only in
        numeric features, where it means "missing" and is imputed by ``prepared``.
        Under DP-SGD a smaller batch is not offered as the fix: the noise is calibrated per step,
        so a tiny batch drowns the gradient in it.
        """
        n = len(self.y_train)
        if n == 0:
            raise FedcareError(
                f"hospital '{self.name}' has no training samples",
                "point the node at a data folder that holds labelled samples",
            )
        if n < batch_size:
            hint = (
                f"too few rows for DP training at batch size {batch_size} (a smaller batch is no fix: "
                "DP noise would drown each step): add patients to this hospital's data, or leave it out "
                "of this run"
                if dp
                else f"lower batch-size to at most {n} (`fedcare simulate --batch-size`, or "
                "run-config batch-size), or leave this hospital out"
            )
            raise FedcareError(
                f"hospital '{self.name}' has {n} training samples, fewer than one batch ({batch_size})", hint
            )
        x = self.x_train
        if self.task not in PIXEL_TASKS and self.numeric_features:
            x = np.delete(x, self.numeric_columns(), axis=-1)
        bad = ~np.isfinite(x)
        if bad.any():
            rows = int(bad.reshape(len(bad), -1).any(axis=1).sum())
            raise FedcareError(
                f"hospital '{self.name}': {rows} training samples hold NaN/inf values outside the numeric features",
                "fix or drop those rows in the source data",
            )
