"""Pooled-training baseline: one model trained on every hospital's training data in one place.

This is the upper reference a federation is judged against (what a central data warehouse would
reach), evaluated on each hospital's own test split. It uses the same model, learning rate,
epochs and (with DP) the same epsilon and delta per patient as the federated run; numeric
features go through the federation's preprocessing with exact pooled sums
(simulation/baseline_pipeline.py). Simulation only: it pools rows.
"""

from __future__ import annotations

import numpy as np

from client.datasets import HospitalData
from client.dp_trainer import DPSettings, evaluate, steps_per_epoch, train
from client.privacy_ledger import calibrate_noise
from client.secret_randomness import SecretRandom
from fedcare.run_config import RunSettings
from shared_models.classification_metrics import BinarySummary
from simulation.baseline_pipeline import baseline_model, federation_normalisation


def pooled_training(hospitals: list[HospitalData], s: RunSettings) -> dict[str, BinarySummary]:
    """Train once on all training rows; return each hospital's test summary (and ``pooled``)."""
    first = hospitals[0]
    x = np.concatenate([h.x_train for h in hospitals])
    y = np.concatenate([h.y_train for h in hospitals])
    mean, std = federation_normalisation(hospitals)
    epochs = s.num_rounds * s.local_epochs
    dp = None
    if s.dp:
        steps = steps_per_epoch(len(y), s.batch_size)
        dp = DPSettings(calibrate_noise([], (1.0 / steps, steps * epochs), s.delta, s.target_epsilon), s.max_grad_norm)
    model = baseline_model(s, first)
    train(
        model,
        first.prepared(x, mean, std),
        y,
        epochs=epochs,
        batch_size=s.batch_size,
        lr=s.learning_rate,
        weight_decay=s.weight_decay,
        dp=dp,
        rng=SecretRandom.reproducible(s.seed),
        optimizer_name=s.local_optimizer,
        patches=s.patch_plan(),
    )
    out = {h.name: evaluate(model, h.prepared(h.x_test, mean, std), h.y_test) for h in hospitals}
    out["pooled"] = sum(list(out.values())[1:], next(iter(out.values())))
    return out
