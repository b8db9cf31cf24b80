"""Flower Message-API strategies fedcare offers, built from run settings."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings


def build_strategy(s: RunSettings) -> FedAvg:
    """FedAvg, FedProx or FedAdam sampling every connected hospital each round (cross-silo).

    The round loop waits for all expected hospitals before the first round; after that a
    strategy must not block on a hospital that went away, hence ``min_available_nodes=1``.
    """
    common: dict[str, Any] = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    if s.strategy == "fedavg":
        return FedAvg(**common)
    if s.strategy == "fedprox":
        return FedProx(proximal_mu=s.proximal_mu, **common)
    if s.strategy == "fedadam":
        return FedAdam(eta=s.server_learning_rate, eta_l=s.learning_rate, beta_1=0.9, beta_2=0.99, tau=1e-3, **common)
    raise FedcareError(f"unknown strategy '{s.strategy}'", "choose one of: fedavg, fedprox, fedadam")
