"""Patch-based 3D training with the patient, not the patch, as the privacy unit.

A study too large for a whole-volume step is trained on patches: each step crops
``PatchPlan.per_study`` patches (``fedcare/run_config.py``) from every sampled study with MONAI's
``RandCropByPosNegLabeld`` (each patch centred on a lesion voxel with probability 1/2 where the
study has a lesion, anywhere otherwise), and the patches of one study go through the network as
consecutive rows of the batch. The DP trainer clips the sum of a study's patch gradients as one
sample (``PerSampleClipper(rows_per_sample=per_study)``), so the sampling rate, the noise and the
accountant are those of whole-volume training: a patient is in a step with all their patches or not
at all. One patch per sample would multiply the patient's privacy loss by the number of patches.

Only the activations of the patches are held, not those of the whole volume; the U-Net predicts a
whole volume window by window at the patch size (``shared_models/volume_unet.py``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from client.secret_randomness import SecretRandom
from fedcare.errors import FedcareError
from fedcare.run_config import PatchPlan


def cut_patches(
    x: torch.Tensor, masks: torch.Tensor, plan: PatchPlan, rng: SecretRandom
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, X, Y, Z) volumes and (B, 1, X, Y, Z) masks -> (B * per_study, C, *size) patches and
    their masks, study i's patches in rows i * per_study .. (i + 1) * per_study - 1."""
    from monai.transforms import RandCropByPosNegLabeld
    from monai.utils import convert_to_tensor

    if masks.dim() != x.dim():
        raise FedcareError(
            "patch-based training needs a mask per study (segmentation)",
            "train classification on whole volumes (leave patch-size empty)",
        )
    plan.check_fits(tuple(x.shape[2:]))
    cropper = RandCropByPosNegLabeld(
        ["image", "label"], "label", spatial_size=plan.size, pos=1.0, neg=1.0, num_samples=plan.per_study
    )
    # MONAI draws crop centres from a numpy RandomState: its state comes from the trainer's secret
    # stream (the hospital's OS entropy), never from the run's seed or anything a message carries
    seed = int(np.frombuffer(rng.random_bytes(4), dtype=np.uint32)[0])
    cropper.set_random_state(seed=seed)
    images, labels = [], []
    with warnings.catch_warnings():
        # a study without a lesion has no voxel to centre a "positive" patch on: MONAI warns and
        # cuts them all anywhere, which is what such a study should give
        warnings.simplefilter("ignore", UserWarning)
        for image, mask in zip(x, masks):
            for patch in cropper({"image": image, "label": mask}):  # plain tensors, not MONAI's MetaTensor
                images.append(convert_to_tensor(patch["image"], track_meta=False))
                labels.append(convert_to_tensor(patch["label"], track_meta=False))
    if not images:
        return x.new_zeros((0, x.shape[1], *plan.size)), masks.new_zeros((0, 1, *plan.size))
    return torch.stack(images), torch.stack(labels)
