"""Each training sample's loss, by what the sample's target is: a label or a mask.

The trainer sums these for DP-SGD (each sample's gradient is clipped on its own, so a sample's loss
must depend on that sample alone) and averages them without DP.

- a 0/1 label per sample: binary cross-entropy on the sample's logit;
- a 0/1 mask per sample (segmentation): MONAI's soft Dice loss on the sample's voxels plus their
  mean binary cross-entropy. Dice alone gives a study without a lesion no useful gradient (its Dice
  is 0 or 1 whatever the probabilities); cross-entropy alone, with lesions at about 1 % of the
  voxels, learns to predict "no lesion" everywhere.
"""

from __future__ import annotations

import torch
from torch import nn


def sample_losses(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) losses: one per sample, for (B,) logits and labels or (B, 1, *spatial) logits and masks."""
    if targets.dim() == 1:
        return nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
    return _dice_losses(outputs, targets) + nn.functional.binary_cross_entropy_with_logits(
        outputs, targets, reduction="none"
    ).flatten(1).mean(1)


def _dice_losses(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    from monai.losses import DiceLoss  # MONAI loads only where a segmentation model trains

    return DiceLoss(sigmoid=True, reduction="none")(logits, masks).flatten(1).mean(1)
