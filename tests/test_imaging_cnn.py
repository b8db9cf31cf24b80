"""SmallCNN: DP-valid (Opacus strict validation), one logit per image, trains under DP-SGD."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from client.dp_trainer import DPSettings, train
from client.secret_randomness import SecretRandom
from fedcare.errors import FedcareError
from shared_models.imaging_cnn import SmallCNN


def test_valid_under_opacus_strict_validation() -> None:
    assert ModuleValidator.validate(SmallCNN(), strict=True) == []


@pytest.mark.parametrize(("size", "channels", "batch"), [(64, 1, 5), (32, 1, 1), (48, 3, 2), (64, 1, 0)])
def test_one_logit_per_image(size: int, channels: int, batch: int) -> None:
    torch.manual_seed(0)
    model = SmallCNN(image_size=size, channels=channels)
    out = model(torch.rand(batch, channels, size, size))
    assert out.shape == (batch,)
    assert torch.isfinite(out).all()


def test_small_enough_for_cpu_dp() -> None:
    assert sum(p.numel() for p in SmallCNN().parameters()) < 20_000


def test_rejects_images_of_the_wrong_shape() -> None:
    model = SmallCNN(image_size=64)
    with pytest.raises(FedcareError, match="expects images shaped"):
        model(torch.rand(2, 1, 96, 96))
    with pytest.raises(FedcareError, match="expects images shaped"):
        model(torch.rand(2, 3, 64, 64))
    with pytest.raises(FedcareError, match="at least 8x8"):
        SmallCNN(image_size=4)


def test_same_seed_same_weights() -> None:
    torch.manual_seed(7)
    a = SmallCNN().state_dict()
    torch.manual_seed(7)
    b = SmallCNN().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trains_with_dp_sgd_and_poisson_sampling_including_empty_batches() -> None:
    size = 32
    images = torch.rand(6, 1, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    torch.manual_seed(0)
    model = SmallCNN(image_size=size)
    before = [p.detach().clone() for p in model.parameters()]
    outcome = train(
        model,
        images.numpy(),
        labels.numpy(),
        epochs=3,
        batch_size=1,
        lr=0.1,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        rng=SecretRandom.reproducible(0),
    )
    assert outcome.steps == [(1.0, 1 / 6, 18)]  # every step, empty Poisson batches included, accounted
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
