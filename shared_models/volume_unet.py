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

Built with a ``patch`` size (patch-based training, ``client/volume_patches.py``), it takes a
training step's patches as they are and predicts a whole volume window by window (MONAI's
``sliding_window_inference``, Gaussian-weighted overlaps), so instance norm sees at test time
windows of the size it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

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
WINDOWS_PER_CALL = 8  # patches through the network at once when a whole volume is predicted


class VolumeUNet(nn.Module):
    """(B, C, X, Y, Z) volumes -> (B, 1, X, Y, Z) lesion logits."""

    def __init__(
        self, channels: int = 1, spatial: Sequence[int] = (32, 32, 20), patch: Sequence[int] | None = None
    ) -> None:
        from monai.networks.nets import UNet

        super().__init__()
        self.channels, self.spatial = channels, tuple(int(s) for s in spatial)
        # trained on patches of this size (client/volume_patches.py): a whole volume is predicted
        # window by window at it, so instance norm sees windows like those it was trained on
        self.patch = tuple(int(s) for s in patch) if patch is not None else None
        factor = 1
        for stride in STRIDES:
            factor *= stride
        for what, sides in (("volume", self.spatial), ("patch", self.patch or ())):
            if any(s % factor for s in sides):
                raise FedcareError(
                    f"the U-Net needs every {what} side divisible by {factor}, got {sides}",
                    f"choose a {what} size divisible by it (the default volume 32 x 32 x 20 is)",
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
        patches = self.patch is not None and tuple(x.shape[2:]) == self.patch  # a training step's patches
        if not patches:
            check_input("VolumeUNet", "volumes", x, self.channels, self.spatial, VOLUME_HINT)
        if self.patch is None or patches:
            logits = self.unet(x)
        else:  # a whole volume from a patch-trained network: window by window
            from monai.inferers import sliding_window_inference

            logits = cast(
                torch.Tensor,
                sliding_window_inference(x, self.patch, WINDOWS_PER_CALL, self.unet, overlap=0.5, mode="gaussian"),
            )
        return logits + PRIOR_LOGIT  # a constant: no parameter, no gradient, no privacy cost
