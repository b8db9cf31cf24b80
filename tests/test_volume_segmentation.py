"""3D segmentation's building blocks: lesion masks from DICOM SEG on the volumes' grid, the U-Net,
and a per-study loss whose clipped per-sample gradients equal a one-study-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from client.datasets import DataSource, load_hospital
from client.datasets.volume_hospital import VolumePolicy
from client.task_losses import sample_losses
from fedcare.errors import FedcareError
from shared_models.registry import build_model, resolve_model
from shared_models.volume_unet import VolumeUNet
from simulation import synthetic_ct
from tests.support.clipping_cases import one_pass_clipped_sum, reference_clipped_sum


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-seg")
    studies = synthetic_ct.STUDIES_PER_HOSPITAL
    synthetic_ct.STUDIES_PER_HOSPITAL = (8, 6)
    try:
        synthetic_ct.write_ct_hospitals(root, 2, seed=5)
    finally:
        synthetic_ct.STUDIES_PER_HOSPITAL = studies
    return root


def test_masks_land_on_the_lesions_of_every_scanner(ct_root, tmp_path):
    """Each series' SEG mask comes out on the volume's grid (both scanners, head and feet first):
    inside it the image differs from the organ around it by the lesion's contrast; a study without
    a lesion has an empty mask; the masks agree with the study labels."""
    lesions = 0
    for i in (0, 1):
        source = DataSource(partition_id=i, data_root=str(ct_root), cache_dir=str(tmp_path / "cache"))
        seg = load_hospital("synthetic-ct", DataSource(**{**source.__dict__, "task": "segment"}))
        labels = load_hospital("synthetic-ct", source)
        assert seg.task == "segmentation" and seg.y_train.dtype == np.uint8
        assert seg.y_train.shape == seg.x_train.shape == (len(seg.x_train), 1, *VolumePolicy().size)
        np.testing.assert_array_equal(seg.x_train, labels.x_train)  # the same split, the same images
        np.testing.assert_array_equal(seg.y_train.reshape(len(seg.y_train), -1).max(axis=1), labels.y_train)
        lesions += int(labels.y_train.sum())
        for image, mask in zip(seg.x_train, seg.y_train):
            if not mask.any():
                continue
            inside = mask[0].astype(bool)
            ring = ndimage.binary_dilation(inside, iterations=2) & ~inside
            # lesions are 80-140 HU off the organ: 0.2-0.35 of the 400 HU window
            assert abs(image[0][inside].mean() - image[0][ring].mean()) > 0.12
    assert lesions > 0
    assert len(list((tmp_path / "cache" / "volumes").glob("*.npz"))) == 4  # one per hospital and task


def test_a_series_without_a_segmentation_is_left_out_with_a_note(ct_root, tmp_path):
    import shutil

    copy = tmp_path / "hospital-0"
    shutil.copytree(ct_root / "hospital-0", copy)
    segs = sorted(copy.rglob("seg.dcm"))
    segs[0].unlink()
    h = load_hospital(
        "dicom-series", DataSource(data_path=str(copy), cache_dir=str(tmp_path / "cache"), task="segment")
    )
    assert len(h.y_train) + len(h.y_test) == len(segs) - 1
    assert h.notes == ["1 series without a segmentation (not used)"]


def test_the_unet_gives_one_logit_per_voxel_and_refuses_sides_it_cannot_halve_twice():
    assert resolve_model("auto", "segmentation") == "unet3d"
    model = build_model("unet3d", (1, 16, 16, 8))
    assert model(torch.zeros(2, 1, 16, 16, 8)).shape == (2, 1, 16, 16, 8)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with pytest.raises(FedcareError, match="divisible by 4"):
        VolumeUNet(spatial=(16, 16, 10))


def test_a_fresh_unet_starts_every_voxel_near_the_lesion_prior_not_at_one_half():
    torch.manual_seed(0)
    with torch.no_grad():
        probabilities = torch.sigmoid(VolumeUNet()(torch.rand(2, 1, 32, 32, 20)))
    assert float((probabilities > 0.5).float().mean()) < 0.01 and 0.005 < float(probabilities.mean()) < 0.08


def test_each_study_loss_depends_on_that_study_alone_and_labels_keep_cross_entropy():
    torch.manual_seed(0)
    logits, masks = torch.randn(3, 1, 4, 4, 4), (torch.rand(3, 1, 4, 4, 4) > 0.8).float()
    masks[1] = 0.0  # a study without a lesion
    losses = sample_losses(logits, masks)
    changed = logits.clone()
    changed[2] += 5.0
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    torch.testing.assert_close(sample_losses(changed, masks)[:2], losses[:2])
    assert sample_losses(changed, masks)[2] != losses[2]
    y = torch.tensor([0.0, 1.0, 1.0])
    torch.testing.assert_close(
        sample_losses(logits[:, 0, 0, 0, 0], y),
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0, 0, 0, 0], y, reduction="none"),
    )


def test_a_study_without_a_lesion_costs_nothing_when_nothing_is_marked_and_more_per_voxel_marked():
    """A lesion-free study has no Dice: it pays by cross-entropy, in proportion to what it marks, not
    the price of a missed lesion for a few stray voxels."""
    empty = torch.zeros(1, 1, 4, 4, 4)
    quiet = torch.full((1, 1, 4, 4, 4), -6.0)
    some, more = quiet.clone(), quiet.clone()
    some[..., :1] = 6.0
    more[..., :2] = 6.0
    losses = [float(sample_losses(logits, empty)) for logits in (quiet, some, more)]
    assert losses[0] < 0.01 and losses[0] < losses[1] < losses[2] < 1.0  # a missed lesion costs 1


def test_unet_clipped_per_study_gradients_match_one_study_at_a_time():
    """Per-sample clipping through MONAI's U-Net (strided and transposed 3D convolutions, instance
    norm, skip connections) with the segmentation loss, in float64, noise off."""
    torch.manual_seed(7)
    model = VolumeUNet(spatial=(8, 8, 4)).double()
    x = torch.randn(4, 1, 8, 8, 4, dtype=torch.float64)
    y = (torch.rand(4, 1, 8, 8, 4, dtype=torch.float64) > 0.7).to(torch.float64)
    y[0] = 0.0
    expected = reference_clipped_sum(model, x, y)
    got = one_pass_clipped_sum(model, x, y)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
