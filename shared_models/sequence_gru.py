"""A GRU over masked, left-padded event sequences, valid under Opacus DP-SGD.

Input ``(B, T, d + 1)``: d step features, then the mask (1 = real event, 0 = padding), as
``client/datasets/ehr_events.py`` builds them. Output: one logit per patient, ``(B,)``.

Why a cell loop and not ``opacus.layers.DPGRU``: a GRU step on a zero input still moves the hidden
state (the biases), so left padding alone would make the result depend on how much padding a
batch carries. Gating the update with the mask, ``h_t = m_t * cell(x_t, h_{t-1}) + (1 - m_t) *
h_{t-1}``, makes padded steps exact no-ops (h stays 0 until the first real event). DPGRU runs
its cells internally and offers no per-step hook for the gate, so this model loops over
``opacus.layers.dp_rnn.DPGRUCell`` itself -- the same cell DPGRU uses, whose ``RNNLinear`` layers get
per-sample gradients accumulated over time steps. Padding inputs are also zeroed, so a NaN or
any value left in a padded step cannot reach the arithmetic.

Parameters, exchanged by ``named_parameters()`` name: ``cell.ih.weight``, ``cell.ih.bias``,
``cell.hh.weight``, ``cell.hh.bias``, ``head.weight``, ``head.bias`` (no alias keys).
"""

from __future__ import annotations

import torch
from opacus.layers.dp_rnn import DPGRUCell
from torch import nn


class SequenceGRU(nn.Module):
    """Masked GRU -> linear head on the hidden state after the patient's latest event."""

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        if n_features < 1 or hidden < 1:
            raise ValueError(f"SequenceGRU needs n_features >= 1 and hidden >= 1, got {n_features}, {hidden}")
        self.n_features = n_features
        self.hidden = hidden
        self.cell = DPGRUCell(n_features, hidden, bias=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.n_features + 1:
            raise ValueError(f"SequenceGRU expects (batch, steps, {self.n_features} + 1 mask), "
                             f"got {tuple(x.shape)}")
        real = x[..., -1:] > 0.5                                  # (B, T, 1)
        steps = torch.where(real, x[..., :-1], torch.zeros((), dtype=x.dtype, device=x.device))
        gate = real.to(x.dtype)
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            m = gate[:, t]
            h = m * self.cell(steps[:, t], h) + (1.0 - m) * h
        return self.head(h).squeeze(-1)
