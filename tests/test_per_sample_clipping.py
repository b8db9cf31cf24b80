"""The one-pass clipped gradient sum equals DP-SGD's definition, computed one sample at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from client.per_sample_clipping import PerSampleClipper
from fedcare.errors import FedcareError
from shared_models.registry import build_model
from tests.support.clipping_cases import CASES, C, one_pass_clipped_sum, reference_clipped_sum


@pytest.mark.parametrize("family", sorted(CASES))
def test_clipped_sum_matches_one_sample_at_a_time(family: str) -> None:
    torch.manual_seed(7)
    model, x = CASES[family]()
    model = model.double()
    if family == "logistic":  # zero-initialised: move off zero so gradients differ per feature
        nn.init.normal_(model.linear.weight)
    y = (torch.rand(len(x), dtype=torch.float64) > 0.5).to(torch.float64)
    expected = reference_clipped_sum(model, x, y)
    got = one_pass_clipped_sum(model, x, y)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
    assert all(p.requires_grad for p in model.parameters())


def test_some_samples_are_clipped_and_some_are_not() -> None:
    """The comparison above is only meaningful if both branches of min(1, C/||g||) occur."""
    torch.manual_seed(7)
    model = build_model("mlp", 7, hidden_units=16).double()
    x = torch.randn(40, 7, dtype=torch.float64) * torch.linspace(0.01, 5, 40, dtype=torch.float64)[:, None]
    y = torch.ones(40, dtype=torch.float64)
    clipper = PerSampleClipper(model, C)
    with clipper.recording():
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum")
    norms = clipper.clip_and_sum(loss, 40)
    assert (norms < C).any() and (norms > C).any()


@pytest.mark.parametrize("family", ["mlp", "cnn", "gru"])
def test_empty_poisson_batch_gives_zero_gradients(family: str) -> None:
    torch.manual_seed(7)
    model, x = CASES[family]()
    model = model.double()
    x, y = x[:0], torch.zeros(0, dtype=torch.float64)
    got = one_pass_clipped_sum(model, x, y)
    assert all(torch.count_nonzero(g) == 0 for g in got)
    assert [g.shape for g in got] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize(
    "layer", [nn.BatchNorm1d(4), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")]
)
def test_unsupported_layer_is_refused_with_its_name(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(3, 4), layer)
    with pytest.raises(FedcareError, match=rf"'1' \({type(layer).__name__}\)"):
        PerSampleClipper(model, C)


def test_only_recorded_passes_are_kept_and_close_leaves_a_plain_model() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 5, hidden_units=4)
    x = torch.randn(3, 5)
    expected = model(x).detach()
    clipper = PerSampleClipper(model, C)
    with clipper.recording():
        model(x)
    model(x)  # e.g. an evaluation between steps: not recorded, nothing held
    assert [len(r.inputs) for r in clipper._records.values()] == [1, 1, 1]
    clipper.close()
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(copy.deepcopy(model)(x), expected)  # a copy runs its own layers


def test_a_loss_that_no_recorded_layer_reaches_gives_zero_gradients() -> None:
    """e.g. a regulariser on the weights alone: there is no per-sample gradient to clip."""
    model = build_model("mlp", 5, hidden_units=4)
    clipper = PerSampleClipper(model, 1.0)
    with clipper.recording():
        model(torch.randn(6, 5))
        loss = sum(p.sum() for p in model.parameters()) * 0.0
    norms = clipper.clip_and_sum(loss, 6)
    assert torch.equal(norms, torch.zeros(6))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
