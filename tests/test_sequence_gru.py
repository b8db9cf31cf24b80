"""SequenceGRU: Opacus-valid, padding-invariant, exact per-sample gradients, DP-SGD incl. empty batches."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared_models.sequence_gru import SequenceGRU

D, T = 5, 6


def batch(n: int, seed: int = 0) -> torch.Tensor:
    """Left-padded sequences of 1..T real steps; padding steps all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, D + 1, generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).float()
    x[..., -1] = mask
    x[..., :-1] *= mask[..., None]
    return x


def model(seed: int = 0) -> SequenceGRU:
    torch.manual_seed(seed)
    return SequenceGRU(D, hidden=8)


def test_opacus_accepts_it_and_it_gives_one_logit_per_patient():
    m = model()
    assert ModuleValidator.validate(m, strict=True) == []
    assert m(batch(7)).shape == (7,)
    assert m(batch(0)).shape == (0,)
    with pytest.raises(ValueError, match=r"expects \(batch, steps, 5 \+ 1 mask\)"):
        m(torch.zeros(2, T, D))


def test_extra_leading_padding_and_padding_content_do_not_change_the_output():
    m, x = model(), batch(16)
    with torch.no_grad():
        ref = m(x)
        longer = torch.cat([torch.zeros(16, 4, D + 1), x], dim=1)
        assert torch.equal(m(longer), ref)
        noisy = x.clone()
        pad = noisy[..., -1] == 0
        noisy[..., :-1][pad] = float("nan")
        assert torch.equal(m(noisy), ref)
        # without the gate a GRU would drift on zero inputs: real steps do change the output
        assert not torch.allclose(m(x[:, -1:]), ref)


def test_parameters_are_named_without_aliases_and_round_trip_by_name():
    from shared_models.weights import load_arrays, model_to_arrays

    m = model(0)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["cell.ih.weight", "cell.ih.bias", "cell.hh.weight", "cell.hh.bias", "head.weight", "head.bias"]
    assert list(m.state_dict()) == names
    other = model(1)
    load_arrays(other, model_to_arrays(m))
    x = batch(4)
    with torch.no_grad():
        assert torch.equal(other(x), m(x))


def test_per_sample_gradients_equal_one_sample_at_a_time():
    m, x = model(), batch(6, seed=3)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    gsm = GradSampleModule(model(), batch_first=True, loss_reduction="sum", force_functorch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.binary_cross_entropy_with_logits(gsm(x), y, reduction="sum").backward()
    for i in range(len(x)):
        m.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(m(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for (name, p), q in zip(m.named_parameters(), gsm._module.parameters()):
            torch.testing.assert_close(q.grad_sample[i], p.grad, msg=name, atol=1e-5, rtol=1e-4)


def test_dp_sgd_with_poisson_sampling_survives_empty_batches():
    torch.manual_seed(0)
    x, y = batch(30, seed=1), (torch.rand(30) > 0.5).float()
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=1)   # sample rate 1/30: many empty batches
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        private, optimizer, loader = engine.make_private(
            module=m, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, grad_sample_mode="hooks")
        sizes = []
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            logits = private(xb)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, yb) if len(yb) else logits.sum() * 0.0
            loss.backward()
            optimizer.step()
            sizes.append(len(yb))
    assert 0 in sizes and any(s > 0 for s in sizes)
    assert sum(steps for _, _, steps in engine.accountant.history) == len(sizes)  # empty steps counted
    after = list(m.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert engine.get_epsilon(1e-5) > 0
