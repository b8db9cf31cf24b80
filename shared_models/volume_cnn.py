"""The default 3D classification network: a compact CNN of MONAI convolution blocks, for DP-SGD.

DP-SGD adds noise of the same size to every parameter, so at the data sizes a hospital holds a
3D network must be small to learn at all. On the generated CT hospitals at epsilon 8
(docs/benchmarks.md, "3D CT classification") this network (about 2,800 parameters) learns the
lesion task federated; with twice the channels (10,700 parameters) the hospitals' noisy updates
no longer averaged into a working model; MONAI's DenseNet does not learn at this volume size even
without DP (``shared_models/volume_densenet.py``).

Three MONAI ``Convolution`` blocks (3x3x3 convolution, GroupNorm, ReLU; the second strided), then
the maximum and the mean of each feature map: a lesion is found by a maximum, not an average.
GroupNorm, not BatchNorm: batch statistics would mix patients, which per-sample gradients cannot
allow. Every layer has a per-sample clipping rule (``client/per_sample_clipping.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shared_models.conv_parts import VOLUME_HINT, check_input, max_and_mean

CHANNELS = (4, 8, 8)
STRIDES = (1, 2, 1)


class VolumeCNN(nn.Module):
    """(B, C, X, Y, Z) volumes -> (B,) logits."""

    def __init__(self, channels: int = 1, spatial: Sequence[int] = (32, 32, 20)) -> None:
        from monai.networks.blocks import Convolution

        super().__init__()
        self.channels, self.spatial = channels, tuple(int(s) for s in spatial)
        blocks, width = [], channels
        for out, stride in zip(CHANNELS, STRIDES):
            blocks.append(
                Convolution(3, width, out, strides=stride, kernel_size=3, act="relu", norm=("group", {"num_groups": 2}))
            )
            width = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("VolumeCNN", "volumes", x, self.channels, self.spatial, VOLUME_HINT)
        return self.head(max_and_mean(self.features(x))).squeeze(-1)
