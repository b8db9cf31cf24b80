"""One hospital's local data as the trainer consumes it, plus its privacy-ledger fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedcare.errors import FedcareError


@dataclass
class HospitalData:
    """Encoded features (float32) and binary labels, split into train and test."""

    name: str
    feature_names: list[str]
    numeric_features: list[str]
    feature_bounds: dict[str, tuple[float, float]]  # public clinical ranges of numeric features
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    def fingerprint(self) -> str:
        """SHA-256 of the training data: the privacy ledger is keyed by it (no patient data)."""
        h = hashlib.sha256()
        h.update(",".join(self.feature_names).encode())
        h.update(np.ascontiguousarray(self.x_train, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.y_train, dtype=np.int64).tobytes())
        return h.hexdigest()

    def check_trainable(self, batch_size: int) -> None:
        """Refuse data that cannot train a model: too few rows or non-finite values.

        A hospital whose training labels are all one class still helps a federation (real
        Fed-Heart-Disease: Switzerland), so that is not an error here.
        """
        n = len(self.y_train)
        if n < batch_size:
            raise FedcareError(
                f"hospital '{self.name}' has {n} training samples, fewer than one batch ({batch_size})",
                f"lower batch-size to at most {n}, or leave this hospital out",
            )
        if not np.isfinite(self.x_train).all():
            bad = int((~np.isfinite(self.x_train)).any(axis=1).sum())
            raise FedcareError(f"hospital '{self.name}': {bad} training rows hold NaN/inf values")
