"""ClippedSumDPOptimizer applies Opacus's DP-SGD update: (clipped sum + N(0, (sigma C)^2)) / batch."""

from __future__ import annotations

import torch
from opacus.accountants import RDPAccountant
from torch import nn

from client.dp_optimizer import ClippedSumDPOptimizer
from client.per_sample_clipping import PerSampleClipper
from shared_models.registry import build_model
from tests.support.clipping_cases import dp_step


def _setup(sigma: float, lr: float = 1.0):
    torch.manual_seed(0)
    model = build_model("mlp", 5, hidden_units=4)
    optimizer = ClippedSumDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=4
    )
    return model, optimizer, torch.randn(8, 5), torch.ones(8)


def test_without_noise_the_update_is_the_clipped_sum_over_the_expected_batch() -> None:
    for flat in (True, False):
        model, optimizer, x, y = _setup(sigma=0.0)
        before = [p.detach().clone() for p in model.parameters()]
        sums = dp_step(optimizer, model, x, y, flat=flat)
        for b, s, p in zip(before, sums, model.parameters()):
            torch.testing.assert_close(p.detach(), b - s / 4)


def test_noise_has_std_sigma_times_clip_norm_over_the_expected_batch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(1000, 200)
    optimizer = ClippedSumDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=2.0, max_grad_norm=3.0, expected_batch_size=5
    )
    x = torch.zeros(0, 1000)  # an empty batch: the update is noise alone
    optimizer.zero_grad(set_to_none=True)
    clipper = PerSampleClipper(model, 3.0)
    with clipper.recording():
        loss = model(x).sum()
    clipper.clip_and_sum(loss, 0)
    optimizer.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    # The noise comes from the hospital's secret stream, never a seed: 200,200 draws of std 1.2 give the
    # mean a standard error of 0.0027 and the std one of 0.0019, so each bound sits > 5 standard errors out.
    assert abs(float(noise.mean())) < 0.015
    assert abs(float(noise.std()) - 2.0 * 3.0 / 5) < 0.01


def test_each_step_reaches_the_accountant_and_a_reused_gradient_is_refused() -> None:
    model, optimizer, x, y = _setup(sigma=1.0)
    accountant = RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.25))
    for _ in range(3):
        dp_step(optimizer, model, x, y)
    assert accountant.history == [(1.0, 0.25, 3)]
    try:
        optimizer.step()  # no zero_grad, no new clipped sum: Opacus refuses to use a gradient twice
    except ValueError:
        pass
    else:
        raise AssertionError("a processed gradient was used again")


def test_a_clipper_kept_across_steps_reuses_its_buffer_and_trains_the_same_model() -> None:
    """The flat gradient buffer is reused once the optimizer is done with it; the result is unchanged."""
    kept, kept_opt, x, y = _setup(sigma=0.0, lr=0.5)
    fresh, fresh_opt, _, _ = _setup(sigma=0.0, lr=0.5)
    clipper = PerSampleClipper(kept, 1.0)
    buffers = set()
    for _ in range(3):
        kept_opt.zero_grad(set_to_none=True)
        with clipper.recording():
            loss = nn.functional.binary_cross_entropy_with_logits(kept(x), y, reduction="sum")
        clipper.clip_and_sum(loss, len(y))
        buffers.add(next(kept.parameters()).grad._base.data_ptr())
        kept_opt.step()
        dp_step(fresh_opt, fresh, x, y)  # a new clipper, hence a new buffer, every step
    assert len(buffers) == 1
    for a, b in zip(kept.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_a_caller_still_holds_are_never_overwritten() -> None:
    model, optimizer, x, y = _setup(sigma=0.0)
    clipper = PerSampleClipper(model, 1.0)
    with clipper.recording():
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum")
    clipper.clip_and_sum(loss, len(y))
    held = [p.grad for p in model.parameters()]
    copies = [g.clone() for g in held]
    optimizer.zero_grad(set_to_none=True)
    with clipper.recording():
        loss = nn.functional.binary_cross_entropy_with_logits(model(2 * x), y, reduction="sum")
    clipper.clip_and_sum(loss, len(y))
    for g, c, p in zip(held, copies, model.parameters()):
        assert torch.equal(g, c) and p.grad.data_ptr() != g.data_ptr()


def test_a_gradient_is_still_refused_twice_with_a_kept_clipper() -> None:
    model, optimizer, x, y = _setup(sigma=1.0)
    clipper = PerSampleClipper(model, 1.0)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with clipper.recording():
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum")
        clipper.clip_and_sum(loss, len(y))
        optimizer.step()
    try:
        optimizer.step()
    except ValueError:
        pass
    else:
        raise AssertionError("a processed gradient was used again")
