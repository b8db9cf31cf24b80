"""What fedcare's image and volume networks share: their input check and their global pooling.

Global max pooling answers "is the finding anywhere?", so a small finding can drive the logit;
average pooling adds how much of it there is. Average pooling alone did not learn on the
synthetic lesion tasks, in 2D or in 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedcare.errors import FedcareError

VOLUME_HINT = "load volumes with the policy the model was built for"


def check_input(model: str, kind: str, x: torch.Tensor, channels: int, spatial: Sequence[int], hint: str) -> None:
    """Refuse a batch that is not (B, channels, *spatial), naming the model and both shapes."""
    if x.dim() != 2 + len(spatial) or x.shape[1] != channels or tuple(x.shape[2:]) != tuple(spatial):
        raise FedcareError(
            f"{model} expects {kind} shaped (B, {channels}, {', '.join(map(str, spatial))}), got {tuple(x.shape)}",
            hint,
        )


def max_and_mean(h: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) feature maps -> (B, 2C): each map's maximum, then each map's mean."""
    dims = tuple(range(2, h.dim()))
    return torch.cat([h.amax(dim=dims), h.mean(dim=dims)], dim=1)
