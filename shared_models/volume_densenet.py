"""MONAI's DenseNet as a 3D classifier (``--model densenet3d``), for volumes larger than the preset's.

At the synthetic-ct preset (32x32x20 at 2 mm) it does not learn, with or without DP: the stem's
strided 7-voxel convolution and pooling blur a lesion of a few voxels away. The default 3D
model is ``shared_models/volume_cnn.py``.

GroupNorm instead of BatchNorm (batch statistics mix patients, which DP-SGD's per-sample
gradients cannot allow), no dropout, and a small configuration (8 initial features, growth 8,
blocks of 2, 4 and 4 layers) so a DP step on a CPU stays affordable. MONAI's own head averages the
last features over the volume, which washes out a lesion of a few dozen voxels; the head here
reads both the maximum and the mean of each feature map (``shared_models/conv_parts.py``). Every layer it uses has a
per-sample clipping rule (``client/per_sample_clipping.py``: Conv3d, GroupNorm, Linear).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shared_models.conv_parts import VOLUME_HINT, check_input, max_and_mean


class VolumeDenseNet(nn.Module):
    """(B, C, X, Y, Z) volumes -> (B,) logits."""

    def __init__(self, channels: int = 1, spatial: Sequence[int] = (32, 32, 20)) -> None:
        from monai.networks.nets import DenseNet

        super().__init__()
        self.channels, self.spatial = channels, tuple(int(s) for s in spatial)
        self.net = DenseNet(
            spatial_dims=3,
            in_channels=channels,
            out_channels=1,
            init_features=8,
            growth_rate=8,
            block_config=(2, 4, 4),
            bn_size=2,
            norm=("group", {"num_groups": 2}),
            dropout_prob=0.0,
        )
        del self.net.class_layers  # replaced: a small lesion is found by a maximum, not an average
        last_norm = self.net.features[-1]
        assert isinstance(last_norm, nn.GroupNorm)  # MONAI's DenseNet ends its features with the norm
        features = last_norm.num_channels
        self.head = nn.Linear(2 * features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("VolumeDenseNet", "volumes", x, self.channels, self.spatial, VOLUME_HINT)
        return self.head(max_and_mean(torch.relu(self.net.features(x)))).squeeze(-1)
