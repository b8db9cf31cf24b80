"""A hospital with a GPU trains the same model as one without: DP-SGD on CUDA matches the CPU.

These run only where torch sees a CUDA device (skipped on CPU-only machines, CI included); the
closing notes say on which GPU they last ran.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client.datasets.fed_heart_disease import load_center
from client.dp_trainer import DPSettings, evaluate, train
from client.secret_randomness import SecretRandom
from shared_models.registry import build_model
from tests.support.clipping_cases import CASES, one_pass_clipped_sum, reference_clipped_sum

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@pytest.mark.parametrize("family", sorted(CASES))
def test_clipped_sum_on_the_gpu_matches_the_cpu_reference(family: str) -> None:
    torch.manual_seed(7)
    model, x = CASES[family]()
    model = model.double()
    if family == "logistic":
        nn.init.normal_(model.linear.weight)
    y = (torch.rand(len(x), dtype=torch.float64) > 0.5).to(torch.float64)
    expected = reference_clipped_sum(model, x, y)
    got = one_pass_clipped_sum(model.cuda(), x.cuda(), y.cuda())
    assert all(g.is_cuda for g in got)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-7, atol=1e-9)


def _standardised_cleveland() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = load_center(0)
    mean, std = data.x_train.mean(0), data.x_train.std(0) + 1e-6
    return (
        ((data.x_train - mean) / std).astype(np.float32),
        data.y_train,
        ((data.x_test - mean) / std).astype(np.float32),
        data.y_test,
    )


def _train_on(dev: str, dp: DPSettings, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, list, float]:
    import client.dp_trainer as trainer

    monkeypatch.setattr(trainer, "device", lambda: torch.device(dev))
    x, y, x_test, y_test = _standardised_cleveland()
    torch.manual_seed(0)
    model = build_model("mlp", x.shape[1], 16)
    outcome = train(model, x, y, epochs=3, batch_size=30, lr=0.3, dp=dp, rng=SecretRandom.reproducible(3))
    accuracy = evaluate(model, x_test, y_test).metrics()["accuracy"]
    return model.cpu(), outcome.steps, accuracy


def test_dp_training_on_the_gpu_gives_the_cpu_model_without_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same Poisson batches (sampled on the CPU from the seed), same clipping, same update."""
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0)
    cpu_model, cpu_steps, cpu_acc = _train_on("cpu", dp, monkeypatch)
    gpu_model, gpu_steps, gpu_acc = _train_on("cuda", dp, monkeypatch)
    assert gpu_steps == cpu_steps and len(gpu_steps) == 1 and gpu_steps[0][2] == 3 * 7
    for (name, a), (_, b) in zip(cpu_model.state_dict().items(), gpu_model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert gpu_acc == pytest.approx(cpu_acc, abs=0.02) and gpu_acc > 0.7


def test_dp_training_with_noise_on_the_gpu_learns_and_is_accounted(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_model, steps, accuracy = _train_on("cuda", DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), monkeypatch)
    assert [s[:2] for s in steps] == [(1.0, 1 / 7)] and steps[0][2] == 21
    assert all(not p.is_cuda for p in gpu_model.parameters())
    assert accuracy > 0.6
