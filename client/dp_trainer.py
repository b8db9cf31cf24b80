"""Local training at a hospital: DP-SGD with Opacus's optimizer and accountant (or plain SGD),
plus evaluation.

The per-sample clipping runs in one backward pass (``client/per_sample_clipping.py``); averaging
and accounting are Opacus's. Poisson sampling and the noise come from the hospital's secret stream
(``client/secret_randomness.py``), never from a seed: the coordinator cannot replay them. Steps
actually taken are read back from the accountant, so the ledger records what really happened,
empty Poisson batches included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.per_sample_clipping import PerSampleClipper
from client.secret_randomness import SecretPoissonBatches, SecretRandom
from client.segmentation_scores import segmentation_summary
from client.task_losses import sample_losses
from client.volume_patches import cut_patches
from fedcare.run_config import LOCAL_OPTIMIZERS, PatchPlan
from shared_models.classification_metrics import BinarySummary, summarize

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

    from client.dp_optimizer import ClippedSumDPOptimizer


EVAL_BATCH = 512  # images: bounded memory at evaluation


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD's parameters. ``sample_rate`` and ``steps_per_epoch``: the privacy plan's, when training
    follows one, so the steps taken are the steps the plan counted even if the data changed size
    since it was made (a patient removed would otherwise add a step at a higher rate); None: from
    the data (``steps_per_epoch``), for runs without a plan (baselines, benchmarks)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float | None = None
    steps_per_epoch: int | None = None


@dataclass
class TrainOutcome:
    steps: list[tuple[float, float, int]]  # accountant history of this round (empty without DP)
    mean_loss: float


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; with Poisson sampling the sample rate is its inverse (Opacus's rule)."""
    return max(1, math.ceil(n / batch_size))


def local_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The torch optimizer a hospital's local steps use (Opacus wraps it under DP)."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown local optimizer {name!r}; one of {', '.join(LOCAL_OPTIMIZERS)}")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    dp: DPSettings | None,
    rng: SecretRandom,
    proximal_mu: float = 0.0,
    optimizer_name: str = "sgd",
    patches: PatchPlan | None = None,
) -> TrainOutcome:
    """Train ``model`` in place for ``epochs`` local epochs; returns the privacy steps taken.

    ``rng`` draws the batches (Poisson sampling under DP, shuffling without) and the DP noise: a
    fresh ``SecretRandom()`` for anything released, ``SecretRandom.reproducible`` only where no
    privacy is claimed (baselines, benchmarks). ``optimizer_name`` (``LOCAL_OPTIMIZERS``) steps on
    the noisy clipped gradient under DP (DP-SGD, DP-Adam): the choice costs no privacy.
    ``patches``: each step trains on patches cut from the sampled studies, a study's patches
    clipped together as one sample (``client/volume_patches.py``); None: whole volumes.
    """
    dev = device()
    model.to(dev).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    optimizer = local_optimizer(optimizer_name, model, lr, weight_decay)
    private = _make_private(model, optimizer, xt, yt, batch_size, dp, rng, patches) if dp is not None else None
    if private is not None:  # the loader: secret Poisson batches with DP, torch's DataLoader without
        optimizer, loader = private.optimizer, cast(Any, private.loader)
    else:
        loader = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True, generator=rng.torch_generator())
    total, batches = 0.0, 0
    try:
        for _ in range(epochs):
            for xb, yb in loader:
                if patches is not None:  # cut where the studies are (CPU), train where the model is
                    xb, yb = cut_patches(xb, yb, patches, rng)
                loss, studies = _step(model, optimizer, private, xb.to(dev), yb.to(dev), patches)
                if anchor is not None:
                    _proximal_step(model, anchor, lr * proximal_mu)
                if studies:
                    total += loss
                    batches += 1
    finally:
        if private is not None:
            private.clipper.close()
    steps = [tuple(e) for e in private.accountant.history] if private is not None else []
    if private is not None:
        model.cpu()
    return TrainOutcome(steps=steps, mean_loss=total / max(batches, 1))


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    private: _PrivateTraining | None,
    x: torch.Tensor,
    y: torch.Tensor,
    patches: PatchPlan | None,
) -> tuple[float, int]:
    """One optimizer step on a batch (of studies' patches with ``patches``): (mean loss per study,
    studies in the batch). Under DP the clipped sum of each study's gradient, noised by the optimizer."""
    studies = len(y) // (patches.per_study if patches is not None else 1)
    optimizer.zero_grad(set_to_none=True)
    if private is None:
        loss = _row_losses(model, x, y, patches).sum() / max(studies, 1)
        loss.backward()
    else:
        with private.clipper.recording():
            loss = _row_losses(model, x, y, patches).sum()  # each study's own gradient
        private.clipper.clip_and_sum(loss, studies)
        loss = loss / max(studies, 1)
    optimizer.step()
    return float(loss.detach()), studies


def _row_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, patches: PatchPlan | None) -> torch.Tensor:
    """Each row's loss; with patches, a patch's loss over the study's patch count, so a study's
    rows sum to the mean loss over its patches."""
    losses = sample_losses(model(x), y)
    return losses if patches is None else losses / patches.per_study


@torch.no_grad()
def _proximal_step(model: nn.Module, anchor: list[torch.Tensor], rate: float) -> None:
    """FedProx's pull towards the round's global model: data-independent, so this decoupled step costs no privacy."""
    for p, p0 in zip(model.parameters(), anchor):
        p.sub_(rate * (p - p0))


@dataclass
class _PrivateTraining:
    clipper: PerSampleClipper
    optimizer: ClippedSumDPOptimizer
    loader: SecretPoissonBatches
    accountant: RDPAccountant


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    dp: DPSettings,
    rng: SecretRandom,
    patches: PatchPlan | None = None,
) -> _PrivateTraining:
    """Opacus's DP-SGD pieces, wired as ``PrivacyEngine.make_private`` wires them: Poisson sampling
    at rate 1 / batches per epoch, the optimizer's step hook feeding an RDP accountant. The batches
    and the noise come from the secret stream, exactly ``steps_per_epoch`` batches an epoch (the
    number the privacy plan counts), and the clipped gradient sum is computed in one backward pass
    (``client/per_sample_clipping.py``)."""
    from opacus.accountants import RDPAccountant  # Opacus loads only where DP training runs

    from client.dp_optimizer import make_dp_optimizer

    steps = dp.steps_per_epoch if dp.steps_per_epoch is not None else steps_per_epoch(len(y), batch_size)
    sample_rate = dp.sample_rate if dp.sample_rate is not None else 1 / steps
    expected_batch_size = int(len(y) * sample_rate)
    private_optimizer = make_dp_optimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        noise=rng,
    )
    accountant = RDPAccountant()
    private_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    loader = SecretPoissonBatches(x, y, sample_rate, steps, rng)
    rows = patches.per_study if patches is not None else 1  # a study's patches are one sample
    clipper = PerSampleClipper(model, dp.max_grad_norm, rows_per_sample=rows)
    return _PrivateTraining(clipper, private_optimizer, loader, accountant)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> BinarySummary:
    """Confusion matrix, loss and score histograms on (x, y); with masks for y, Dice and HD95 too."""
    dev = device()
    model = model.to(dev).eval()
    probs, loss_sum = [], 0.0
    for start in range(0, len(y), EVAL_BATCH):
        xt = torch.as_tensor(x[start : start + EVAL_BATCH], dtype=torch.float32, device=dev)
        yt = torch.as_tensor(y[start : start + EVAL_BATCH], dtype=torch.float32, device=dev)
        logits = model(xt)
        loss_sum += float(sample_losses(logits, yt).sum())
        probs.append(torch.sigmoid(logits).cpu().numpy())
    scores = np.concatenate(probs) if probs else np.zeros((0, *np.shape(y)[1:]))
    if np.ndim(y) > 1:  # a mask per sample: Dice, HD95 and lesion detection per study
        return segmentation_summary(scores, y, loss_sum)
    return summarize(scores, y, loss_sum)
