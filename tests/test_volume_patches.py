"""Patch-based 3D training: a study's patches are one DP sample (the patient stays the privacy unit),
patches are cut around lesions and inside their own study, and a U-Net trained on patches predicts
whole volumes window by window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.dp_trainer import DPSettings, evaluate, train
from client.per_sample_clipping import PerSampleClipper
from client.secret_randomness import SecretRandom
from client.task_losses import sample_losses
from client.volume_patches import cut_patches
from fedcare.errors import FedcareError
from fedcare.protocol import RunRequest
from fedcare.run_config import PatchPlan, RunSettings
from shared_models.registry import build_model
from tests.support.clipping_cases import CASES, C, reference_clipped_sum

ROWS = 3  # patches per study in the clipping checks


@pytest.mark.parametrize("family", ["conv3d-unet", "monai-unet3d", "cnn3d", "mlp", "cnn", "conv1d-transposed"])
def test_a_study_s_patches_are_clipped_together_as_one_sample(family: str) -> None:
    """With rows_per_sample, the one-pass clipped sum equals clipping each study's summed gradient,
    and differs from clipping every patch on its own (what would make a patch the privacy unit)."""
    torch.manual_seed(3)
    model, x = CASES[family]()
    model = model.double()
    x = torch.cat([x, x.flip(0)])[: (2 * len(x)) // ROWS * ROWS] * 3  # several studies, some clipped
    y = (torch.rand(len(x), dtype=torch.float64) > 0.5).to(torch.float64)
    expected = reference_clipped_sum(model, x, y, ROWS)
    clipper = PerSampleClipper(model, C, rows_per_sample=ROWS)
    with clipper.recording():
        loss = sample_losses(model(x), y).sum()
    norms = clipper.clip_and_sum(loss, len(y) // ROWS)
    clipper.close()
    got = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    assert norms.shape == (len(y) // ROWS,)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
    per_patch = reference_clipped_sum(model, x, y)
    assert any(not torch.allclose(a, b) for a, b in zip(per_patch, expected))


def test_a_gru_is_refused_patches():
    model, x = CASES["gru"]()
    clipper = PerSampleClipper(model.double(), C, rows_per_sample=2)
    with clipper.recording():
        loss = sample_losses(model(x[:4]), torch.ones(4, dtype=torch.float64)).sum()
    with pytest.raises(FedcareError, match="one sequence per sample"):
        clipper.clip_and_sum(loss, 2)


def _studies(n: int = 4, spatial=(16, 16, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """Study i's voxels all equal i; even studies have a 3-voxel lesion in one corner."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1, 1).expand(n, 1, *spatial).clone()
    masks = torch.zeros(n, 1, *spatial)
    masks[::2, 0, 1:4, 1, 1] = 1
    return x, masks


def test_patches_come_from_their_own_study_in_order_and_about_half_of_them_hold_the_lesion():
    x, masks = _studies()
    plan = PatchPlan((4, 4, 4), 40)
    patches, patch_masks = cut_patches(x, masks, plan, SecretRandom.reproducible(0))
    assert type(patches) is torch.Tensor and patches.shape == patch_masks.shape == (160, 1, 4, 4, 4)
    studies = patches.flatten(1)[:, 0].view(4, 40)  # each row's (constant) value = its study
    assert torch.equal(studies, torch.arange(4.0).view(4, 1).expand(4, 40))
    marked = patch_masks.flatten(1).amax(1).view(4, 40)
    # a lesion study: a patch is centred on a lesion voxel with probability 1/2 (a random centre
    # in 12 x 16 x 16 voxels rarely catches the 3-voxel lesion)
    assert 0.3 < float(marked[0::2].mean()) < 0.75
    assert marked[1::2].sum() == 0
    again, _ = cut_patches(x, masks, plan, SecretRandom.reproducible(0))
    assert torch.equal(again, patches)


def test_patches_need_masks_and_must_fit_in_the_volume():
    x, masks = _studies()
    with pytest.raises(FedcareError, match="mask per study"):
        cut_patches(x, masks.flatten(1).amax(1), PatchPlan((8, 8, 4), 2), SecretRandom.reproducible(0))
    with pytest.raises(FedcareError, match="does not fit in volumes of 16x16x12"):
        cut_patches(x, masks, PatchPlan((8, 8, 16), 2), SecretRandom.reproducible(0))


def test_the_run_config_names_patches_and_refuses_bad_ones():
    settings = RunSettings.for_dataset("synthetic-ct", task="segment", patch_size="16x16x12", patches_per_study=2)
    assert settings.patch_plan() == PatchPlan((16, 16, 12), 2)
    assert RunSettings.for_dataset("synthetic-ct", task="segment").patch_plan() is None
    request = RunRequest.from_config(RunRequest("synthetic-ct", patch_size="8x8x4", patches_per_study=3).to_config())
    assert request.patch_plan() == PatchPlan((8, 8, 4), 3)
    with pytest.raises(FedcareError, match="is for segmentation"):
        RunSettings.for_dataset("synthetic-ct", patch_size="16x16x12")
    for size, count, match in (("16x16", 4, "three voxel counts"), ("16x0x12", 4, ">= 1"), ("8x8x4", 0, ">= 1")):
        with pytest.raises(FedcareError, match=match):
            RunSettings.for_dataset("synthetic-ct", task="segment", patch_size=size, patches_per_study=count)
    with pytest.raises(FedcareError, match="three voxel counts"):  # a coordinator's request is checked too
        RunRequest("synthetic-ct", patch_size="all of it").patch_plan()


def test_a_unet_trained_on_patches_predicts_whole_volumes_window_by_window():
    torch.manual_seed(0)
    unet = build_model("unet3d", (1, 32, 32, 20), patch=(16, 16, 12))
    assert unet(torch.zeros(3, 1, 16, 16, 12)).shape == (3, 1, 16, 16, 12)  # a step's patches
    unet.eval()
    with torch.no_grad():
        assert unet(torch.rand(2, 1, 32, 32, 20)).shape == (2, 1, 32, 32, 20)
    with pytest.raises(FedcareError, match=r"expects volumes shaped \(B, 1, 32, 32, 20\)"):
        unet(torch.zeros(1, 1, 24, 24, 20))
    with pytest.raises(FedcareError, match="every patch side divisible by 4"):
        build_model("unet3d", (1, 32, 32, 20), patch=(16, 16, 10))
    whole = build_model("unet3d", (1, 32, 32, 20))
    assert [p.shape for p in whole.parameters()] == [p.shape for p in unet.parameters()]  # one model on the wire


def test_dp_training_on_patches_counts_the_same_steps_and_learns_lesions():
    """The accountant sees patients sampled at the whole-volume rate (the patches change nothing it
    counts), and the patch-trained U-Net marks lesions in whole volumes it never saw."""
    rng = np.random.default_rng(0)
    n, spatial = 24, (16, 16, 12)
    x = rng.normal(0.3, 0.05, (n, 1, *spatial)).astype(np.float32)
    masks = np.zeros((n, 1, *spatial), dtype=np.float32)
    for i in range(0, n, 2):  # a bright 4-voxel cube somewhere in every other study
        cx, cy, cz = rng.integers(2, 10), rng.integers(2, 10), rng.integers(2, 8)
        masks[i, 0, cx : cx + 4, cy : cy + 4, cz : cz + 4] = 1
    x += masks * 0.5
    plan = PatchPlan((8, 8, 4), 4)
    dp = DPSettings(0.5, 0.1)  # the segmentation preset's clipping norm
    steps = {}
    for patches in (None, plan):
        torch.manual_seed(0)
        model = build_model("unet3d", (1, *spatial), patch=patches.size if patches else None)
        outcome = train(
            model,
            x,
            masks,
            epochs=30,
            batch_size=8,
            lr=0.01,
            dp=dp,
            rng=SecretRandom.reproducible(1),
            optimizer_name="adam",
            patches=patches,
        )
        steps[patches is not None] = outcome.steps
    assert steps[True] == steps[False] == [(0.5, 8 / 24, 90)]  # 3 batches x 30 epochs
    summary = evaluate(model, x, masks)
    assert summary.dice_sum / summary.dice_n > 0.5


def test_an_empty_poisson_batch_of_studies_steps_on_noise_alone():
    """No study sampled: no patches to cut, every clipped gradient zero (the optimizer adds noise)."""
    unet = build_model("unet3d", (1, 32, 32, 20), patch=(16, 16, 12))
    x, masks = cut_patches(
        torch.zeros(0, 1, 32, 32, 20),
        torch.zeros(0, 1, 32, 32, 20),
        PatchPlan((16, 16, 12), 4),
        SecretRandom.reproducible(0),
    )
    clipper = PerSampleClipper(unet, 0.1, rows_per_sample=4)
    with clipper.recording():
        loss = sample_losses(unet(x), masks).sum()
    assert clipper.clip_and_sum(loss, 0).numel() == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in unet.parameters())
