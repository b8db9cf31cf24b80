"""Local-only baselines: each hospital trains alone on its own data, same model and privacy.

A researcher compares the federated model against what each hospital could reach by itself.
The baseline uses the same model, learning rate, total local epochs and (with DP) the same
target epsilon and delta as the federated run; its normalisation uses only the hospital's own
training data. It never leaves the hospital, so it touches no ledger.
"""

from __future__ import annotations

import numpy as np
import torch

from client.datasets import HospitalData
from client.dp_trainer import DPSettings, evaluate, steps_per_epoch, train
from client.feature_stats import normalise
from client.privacy_ledger import calibrate_noise
from fedcare.run_config import RunSettings
from shared_models.classification_metrics import BinarySummary
from shared_models.registry import build_model


def local_only(data: HospitalData, s: RunSettings) -> BinarySummary:
    """Train on this hospital alone and evaluate on its test split."""
    cols = [data.feature_names.index(f) for f in data.numeric_features]
    mean = data.x_train[:, cols].mean(axis=0)
    std = np.maximum(data.x_train[:, cols].std(axis=0), 1e-6)
    x_tr = normalise(data.x_train, cols, mean.tolist(), std.tolist())
    x_te = normalise(data.x_test, cols, mean.tolist(), std.tolist())
    epochs = s.num_rounds * s.local_epochs
    dp = None
    if s.dp:
        steps = steps_per_epoch(len(data.y_train), s.batch_size)
        sigma = calibrate_noise([], (1.0 / steps, steps * epochs), s.delta, s.target_epsilon)
        dp = DPSettings(sigma, s.max_grad_norm)
    torch.manual_seed(s.seed)
    model = build_model(s.model, data.n_features)
    train(model, x_tr, data.y_train, epochs=epochs, batch_size=min(s.batch_size, len(data.y_train)),
          lr=s.learning_rate, weight_decay=s.weight_decay, dp=dp, seed=s.seed)
    return evaluate(model, x_te, data.y_test)
