"""Build a model by name, so server and hospitals instantiate the same architecture."""

from __future__ import annotations

from torch import nn

from fedcare.errors import FedcareError
from shared_models.tabular import MLP, LogisticRegression

_BUILDERS = {"logistic": LogisticRegression, "mlp": MLP}


def build_model(name: str, n_features: int) -> nn.Module:
    """A freshly initialised model (seed torch first for reproducible weights)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise FedcareError(
            f"unknown model '{name}'", f"choose one of: {', '.join(sorted(_BUILDERS))}"
        ) from None
    return builder(n_features)
