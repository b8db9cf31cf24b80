"""SmallCNN: DP-valid (Opacus strict validation), one logit per image, trains under DP-SGD."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

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


def test_trains_under_opacus_poisson_hooks_including_empty_batches() -> None:
    torch.manual_seed(0)
    size = 32
    images = torch.rand(6, 1, size, size)
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    model = SmallCNN(image_size=size)
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(TensorDataset(images, labels), batch_size=1, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and full-backward-hook notices
        engine = PrivacyEngine()
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, grad_sample_mode="hooks",
        )
        sizes = []
        for _ in range(3):
            for x, y in loader:
                optimizer.zero_grad()
                logits = private(x)
                assert logits.shape == y.shape
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / max(len(y), 1)
                loss.backward()
                optimizer.step()
                sizes.append(len(y))
    assert 0 in sizes, "the seeded Poisson sampler should have produced an empty batch"
    assert any(n > 0 for n in sizes)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert engine.accountant.history  # every step, empty ones included, was accounted
