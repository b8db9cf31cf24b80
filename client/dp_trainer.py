"""Local training at a hospital: DP-SGD through Opacus (or plain SGD), plus evaluation.

The model arrives fresh each round (Opacus cannot wrap a module twice). Steps actually taken are
read back from Opacus's accountant, so the ledger records what really happened, empty Poisson
batches included.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared_models.classification_metrics import BinarySummary, summarize


EVAL_BATCH = 512  # images: bounded memory at evaluation


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float


@dataclass
class TrainOutcome:
    steps: list[tuple[float, float, int]]  # accountant history of this round (empty without DP)
    mean_loss: float


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; with Poisson sampling the sample rate is its inverse (Opacus's rule)."""
    return max(1, math.ceil(n / batch_size))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, lr: float,
          weight_decay: float = 0.0,
          dp: DPSettings | None, seed: int, proximal_mu: float = 0.0) -> TrainOutcome:
    """Train ``model`` in place for ``epochs`` local epochs; returns the privacy steps taken."""
    torch.manual_seed(seed)
    dev = device()
    model.to(dev).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    dataset = TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    engine = None
    if dp is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG off": see README, DP section
            engine = PrivacyEngine(accountant="rdp")
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True, grad_sample_mode="hooks",
            )
    loss_fn = nn.BCEWithLogitsLoss()
    plain = getattr(model, "_module", model)
    total, batches = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(dev), yb.to(dev)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb) if len(yb) else logits.sum() * 0.0
            with warnings.catch_warnings():
                # Opacus's hooks on a first layer whose input needs no grad: expected, harmless.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            optimizer.step()
            if anchor is not None:
                # FedProx's proximal term is data-independent: a decoupled step costs no privacy.
                with torch.no_grad():
                    for p, p0 in zip(plain.parameters(), anchor):
                        p.sub_(lr * proximal_mu * (p - p0))
            if len(yb):
                total += float(loss.detach())
                batches += 1
    steps = [tuple(e) for e in engine.accountant.history] if engine is not None else []
    if engine is not None:
        plain.cpu()
    return TrainOutcome(steps=steps, mean_loss=total / max(batches, 1))


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> BinarySummary:
    """Confusion matrix, loss and score histograms on (x, y)."""
    dev = device()
    model = getattr(model, "_module", model).to(dev).eval()
    probs, loss_sum = [], 0.0
    for start in range(0, len(y), EVAL_BATCH):
        xt = torch.as_tensor(x[start:start + EVAL_BATCH], dtype=torch.float32, device=dev)
        yt = torch.as_tensor(y[start:start + EVAL_BATCH], dtype=torch.float32, device=dev)
        logits = model(xt)
        loss_sum += float(nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="sum"))
        probs.append(torch.sigmoid(logits).cpu().numpy())
    return summarize(np.concatenate(probs) if probs else np.zeros(0), y, loss_sum)
