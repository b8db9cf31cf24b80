"""The 3D segmentation network: MONAI's U-Net with instance norm, small for DP-SGD (8,935 parameters).

One logit per voxel (lesion or not). MONAI's ``UNet``: residual units, strided convolutions down,
transposed convolutions up, skip connections between the levels. Instance norm, not BatchNorm:
batch statistics would mix patients, which per-sample gradients cannot allow. Every layer it uses
(Conv3d, ConvTranspose3d, InstanceNorm3d, ReLU) has a per-sample clipping rule
(``client/per_sample_clipping.py``; ``tests/test_volume_segmentation.py`` checks the clipped sum).

Measured on the generated CT hospitals, trained centrally without DP (Adam, 12 epochs): instance
norm reached a test Dice of 0.75 with no false-positive study; GroupNorm with one group (the only
group count MONAI's one-channel last layer allows) learned a fixed blob at the organ's centre
(Dice 0.42-0.49, a lesion "found" in every negative study). Plain SGD learned only that blob too,
with or without momentum: runs segment with Adam (``local-optimizer``, the segmentation preset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedcare.errors import FedcareError
from shared_models.conv_parts import VOLUME_HINT, check_input

CHANNELS = (4, 8, 16)
STRIDES = (2, 2)
# Every voxel starts at this lesion probability, not at 0.5 (the prior-probability start of
# RetinaNet's focal-loss paper): lesions are 1-2 % of a study's voxels. From 0.5 the model first has
# to shrink a study-sized blob, which under DP noise took most of a run (Dice 0.15 after 10 rounds
# at epsilon 8); from 0.02 the first rounds already place the lesion (docs/benchmarks.md).
LESION_PRIOR = 0.02
PRIOR_LOGIT = math.log(LESION_PRIOR / (1 - LESION_PRIOR))


class VolumeUNet(nn.Module):
    """(B, C, X, Y, Z) volumes -> (B, 1, X, Y, Z) lesion logits."""

    def __init__(self, channels: int = 1, spatial: Sequence[int] = (32, 32, 20)) -> None:
        from monai.networks.nets import UNet

        super().__init__()
        self.channels, self.spatial = channels, tuple(int(s) for s in spatial)
        factor = 1
        for stride in STRIDES:
            factor *= stride
        if any(s % factor for s in self.spatial):
            raise FedcareError(
                f"the U-Net needs every volume side divisible by {factor}, got {self.spatial}",
                "load volumes with a policy size divisible by it (the default 32 x 32 x 20 is)",
            )
        self.unet = UNet(
            spatial_dims=3,
            in_channels=channels,
            out_channels=1,
            channels=CHANNELS,
            strides=STRIDES,
            num_res_units=1,
            norm="instance",
            act="relu",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("VolumeUNet", "volumes", x, self.channels, self.spatial, VOLUME_HINT)
        return self.unet(x) + PRIOR_LOGIT  # a constant: no parameter, no gradient, no privacy cost
