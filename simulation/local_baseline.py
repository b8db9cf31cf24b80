"""Local-only baselines: each hospital trains alone on its own data, same model and privacy.

A researcher compares the federated model against what each hospital could reach by itself.
The baseline uses the same model, learning rate, total local epochs and (with DP) the same
target epsilon and delta as the federated run, and the federation's preprocessing
(simulation/baseline_pipeline.py) applied to the hospital's own training data alone. It never leaves the hospital, so it touches no ledger.
"""

from __future__ import annotations

from client.datasets import HospitalData
from client.dp_trainer import DPSettings, evaluate, steps_per_epoch, train
from client.privacy_ledger import calibrate_noise
from client.secret_randomness import SecretRandom
from fedcare.run_config import RunSettings
from shared_models.classification_metrics import BinarySummary
from simulation.baseline_pipeline import baseline_model, federation_normalisation


def local_only(data: HospitalData, s: RunSettings) -> BinarySummary:
    """Train on this hospital alone and evaluate on its test split."""
    mean, std = federation_normalisation([data])
    x_tr = data.prepared(data.x_train, mean, std)
    x_te = data.prepared(data.x_test, mean, std)
    epochs = s.num_rounds * s.local_epochs
    dp = None
    if s.dp:
        steps = steps_per_epoch(len(data.y_train), s.batch_size)
        sigma = calibrate_noise([], (1.0 / steps, steps * epochs), s.delta, s.target_epsilon)
        dp = DPSettings(sigma, s.max_grad_norm)
    model = baseline_model(s, data)
    train(
        model,
        x_tr,
        data.y_train,
        epochs=epochs,
        batch_size=min(s.batch_size, len(data.y_train)),
        lr=s.learning_rate,
        weight_decay=s.weight_decay,
        dp=dp,
        rng=SecretRandom.reproducible(s.seed),
        optimizer_name=s.local_optimizer,
        patches=s.patch_plan(),
    )
    return evaluate(model, x_te, data.y_test)
