"""SequenceGRU: Opacus-valid, padding-invariant, a standard GRU cell, DP-SGD incl. empty batches.

Its clipped per-sample gradients are checked in tests/test_per_sample_clipping.py."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from client.dp_trainer import DPSettings, train
from client.secret_randomness import SecretRandom
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


def test_the_cell_computes_pytorchs_gru_equations():
    m = model()
    ref = nn.GRUCell(D, 8)
    with torch.no_grad():
        for mine, theirs in ((m.cell.ih, "ih"), (m.cell.hh, "hh")):
            getattr(ref, f"weight_{theirs}").copy_(mine.weight)
            getattr(ref, f"bias_{theirs}").copy_(mine.bias)
        x, h = torch.randn(5, D), torch.randn(5, 8)
        torch.testing.assert_close(m.cell.step(m.cell.ih(x), h), ref(x, h))


def test_dp_sgd_with_poisson_sampling_survives_empty_batches():
    """Sample rate 1/30: many Poisson batches are empty; each still counts as a step."""
    x, y = batch(30, seed=1), (torch.rand(30, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    outcome = train(
        m,
        x.numpy(),
        y.numpy(),
        epochs=2,
        batch_size=1,
        lr=0.1,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        rng=SecretRandom.reproducible(0),
    )
    assert outcome.steps == [(1.0, 1 / 30, 60)]
    after = list(m.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
