"""What the membership-inference audit attacks: fedcare's MLP trained by the client's DP trainer, on
a hospital's own rows.

``audit.membership_attack`` holds the attack and its statistics (LiRA, the epsilon lower bound)
and knows nothing of fedcare's trainer or datasets; this module plugs them in as its ``train_fn``
and ``(x, y)``, so the audit library stays below the client (``fedcare audit attack`` runs both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audit.membership_attack import PredictFn


@dataclass
class FedcareMLP:
    """``train_fn`` training fedcare's MLP with ``client.dp_trainer.train`` (plain SGD or DP-SGD).

    ``last_history`` is the Opacus accountant history of the last model trained (empty without
    DP); ``last_epsilon()`` turns it into epsilon at ``delta`` with the privacy ledger's accountant.
    """

    hidden: int = 64
    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 0.0
    noise_multiplier: float | None = None  # None = no DP
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    last_history: list[tuple[float, float, int]] = field(default_factory=list)

    def __call__(self, x: np.ndarray, y: np.ndarray, seed: int) -> PredictFn:
        import torch

        from client.dp_trainer import DPSettings, train
        from client.secret_randomness import SecretRandom
        from shared_models.registry import build_model

        torch.manual_seed(seed)
        model = build_model("mlp", (x.shape[1],), self.hidden)
        dp = None if self.noise_multiplier is None else DPSettings(self.noise_multiplier, self.max_grad_norm)
        outcome = train(
            model,
            x.astype(np.float32),
            y.astype(np.float32),
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            dp=dp,
            rng=SecretRandom.reproducible(seed, "membership-audit"),
        )
        self.last_history = list(outcome.steps)
        model.cpu().eval()

        def predict(xq: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                logits = model(torch.as_tensor(np.asarray(xq, dtype=np.float32))).double()
            return torch.sigmoid(logits).numpy()

        return predict

    def last_epsilon(self) -> float | None:
        if self.noise_multiplier is None:
            return None
        from fedcare.dp_accounting import epsilon_of

        return epsilon_of(self.last_history, self.delta)

    def calibrate(self, n_train: int, target_epsilon: float) -> FedcareMLP:
        """Set the noise multiplier so one model on ``n_train`` rows spends ``target_epsilon``."""
        from client.dp_trainer import steps_per_epoch
        from client.privacy_ledger import calibrate_noise

        steps = steps_per_epoch(n_train, self.batch_size)
        self.noise_multiplier = calibrate_noise([], (1.0 / steps, steps * self.epochs), self.delta, target_epsilon)
        return self


def load_dataset(name: str, hospital: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) for the attack: ``digits`` (sklearn, binary digit < 5) or ``fed-heart-disease``.

    Heart disease: every row of the cleaned table (or one ``hospital``'s rows), features
    standardised locally -- the audit runs on a hospital's own data, nothing leaves it.
    """
    from fedcare.errors import FedcareError

    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.data / 16.0).astype(np.float32), (digits.target < 5).astype(np.int64)
    if name == "fed-heart-disease":
        from client.datasets.fed_heart_disease import CENTERS, feature_names, load_table

        table = load_table()
        if hospital is not None:
            if hospital not in CENTERS:
                raise FedcareError(f"unknown hospital {hospital!r}", f"choose one of: {', '.join(CENTERS)}")
            table = table[table["center"] == hospital]
        x = table[feature_names()].to_numpy(dtype=np.float64)
        x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        return x.astype(np.float32), table["label"].to_numpy(dtype=np.int64)
    raise FedcareError(f"unknown dataset {name!r} for the membership audit", "choose digits or fed-heart-disease")
