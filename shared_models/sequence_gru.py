"""A GRU over masked, left-padded event sequences, valid under Opacus DP-SGD.

Input ``(B, T, d + 1)``: d step features, then the mask (1 = real event, 0 = padding), as
``client/datasets/ehr_events.py`` builds them. Output: one logit per patient, ``(B,)``.

Why a cell loop and not ``nn.GRU``: a GRU step on a zero input still moves the hidden state (the
biases), so left padding alone would make the result depend on how much padding a batch carries.
Gating the update with the mask, ``h_t = m_t * cell(x_t, h_{t-1}) + (1 - m_t) * h_{t-1}``, makes
padded steps exact no-ops (h stays 0 until the first real event). Padding inputs are also zeroed,
so a NaN or any value left in a padded step cannot reach the arithmetic.

The cell is written with two plain ``nn.Linear`` maps (the gate equations of ``nn.GRUCell`` and
Opacus's ``DPGRUCell``): the input map runs once over all time steps, the hidden map once per
step. That is what lets DP-SGD compute per-sample gradient norms in closed form
(``client/per_sample_clipping.py``) instead of materialising a gradient per sample and step.

Parameters, exchanged by ``named_parameters()`` name: ``cell.ih.weight``, ``cell.ih.bias``,
``cell.hh.weight``, ``cell.hh.bias``, ``head.weight``, ``head.bias`` (no alias keys).
"""

from __future__ import annotations

import torch
from torch import nn


class SequenceGRU(nn.Module):
    """Masked GRU -> linear head on the hidden state after the patient's latest event."""

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        if n_features < 1 or hidden < 1:
            raise ValueError(f"SequenceGRU needs n_features >= 1 and hidden >= 1, got {n_features}, {hidden}")
        self.n_features = n_features
        self.hidden = hidden
        self.cell = GRUGates(n_features, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.n_features + 1:
            raise ValueError(f"SequenceGRU expects (batch, steps, {self.n_features} + 1 mask), got {tuple(x.shape)}")
        real = x[..., -1:] > 0.5  # (B, T, 1)
        steps = torch.where(real, x[..., :-1], torch.zeros((), dtype=x.dtype, device=x.device))
        gate = real.to(x.dtype)
        gates_x = self.cell.ih(steps)  # (B, T, 3H), all steps at once
        h = x.new_zeros(x.shape[0], self.hidden)
        # unbind, not gates_x[:, t]: backward then stacks the T step gradients once instead of
        # writing each into its own zero-filled (B, T, 3H) tensor and adding those up
        for gates_t, gate_t in zip(gates_x.unbind(1), gate.unbind(1)):
            h = h + gate_t * (self.cell.step(gates_t, h) - h)
        return self.head(h).squeeze(-1)


class GRUGates(nn.Module):
    """The GRU cell's two affine maps; ``step`` applies the gate equations of ``nn.GRUCell``."""

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(n_features, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden)
        bound = hidden**-0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def step(self, gates_x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h_t from the input map's output for this step and h_{t-1} (order r, z, n as in PyTorch)."""
        gates_h = self.hh(h)
        rz = torch.sigmoid(gates_x[:, : 2 * self.hidden] + gates_h[:, : 2 * self.hidden])
        r, z = rz[:, : self.hidden], rz[:, self.hidden :]
        n = torch.tanh(gates_x[:, 2 * self.hidden :] + r * gates_h[:, 2 * self.hidden :])
        return n + z * (h - n)
