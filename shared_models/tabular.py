"""Models for tabular EHR features. Both are valid under Opacus (no BatchNorm, plain Linear)."""

from __future__ import annotations

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """One linear layer producing a logit: the FLamby baseline for Fed-Heart-Disease."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)
        # The loss is convex: start at the all-zero model (p = 0.5) rather than a random point
        # that noisy DP steps would first have to walk away from.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    """A small two-hidden-layer perceptron producing a logit."""

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
