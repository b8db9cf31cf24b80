"""Per-sample clipping cases: models of every family with inputs, and DP-SGD's clipped sum two ways.

Shared by the CPU test (``tests/test_per_sample_clipping.py``) and the GPU one (``tests/test_gpu_training.py``);
``dp_step`` by the DP optimizer's tests (``tests/test_dp_optimizer.py``, ``tests/test_compat.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from client.per_sample_clipping import PerSampleClipper
from client.task_losses import sample_losses
from shared_models.registry import build_model

C = 1.0  # the clip norm every case uses


def reference_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int = 1) -> list[torch.Tensor]:
    """sum_i clip(g_i), with microbatches of one sample and Opacus's clip factor (the trainer's loss:
    labels or masks); a sample is ``rows`` consecutive rows (a study's patches), its gradient their sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(0, len(y), rows):
        model.zero_grad(set_to_none=True)
        sample_losses(model(x[i : i + rows]), y[i : i + rows]).sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        coef = (C / (norm + 1e-6)).clamp(max=1.0)
        total = [t + coef * g for t, g in zip(total, grads)]
    model.zero_grad(set_to_none=True)
    return total


def one_pass_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """sum_i clip(g_i) as fedcare computes it: one recorded pass through ``PerSampleClipper``."""
    clipper = PerSampleClipper(model, C)
    with clipper.recording():
        loss = sample_losses(model(x), y).sum()
    clipper.clip_and_sum(loss, len(y))
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def _sequences(n: int, steps: int, features: int) -> torch.Tensor:
    """Left-padded sequences: mask column last, each patient with 1..steps real events."""
    x = torch.randn(n, steps, features + 1, dtype=torch.float64)
    lengths = torch.randint(1, steps + 1, (n,))
    mask = (torch.arange(steps)[None, :] >= steps - lengths[:, None]).to(torch.float64)
    x[..., -1] = mask
    x[..., :-1][mask == 0] = float("nan")  # padding content must not matter
    return x


CASES = {
    "logistic": lambda: (build_model("logistic", 7), torch.randn(12, 7, dtype=torch.float64) * 3),
    "mlp": lambda: (build_model("mlp", 7, hidden_units=16), torch.randn(12, 7, dtype=torch.float64) * 3),
    "cnn": lambda: (build_model("cnn", (1, 16, 16)), torch.randn(6, 1, 16, 16, dtype=torch.float64)),
    "cnn-rgb": lambda: (build_model("cnn", (3, 8, 8)), torch.randn(5, 3, 8, 8, dtype=torch.float64)),
    "conv-strided": lambda: (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1),
            nn.GroupNorm(1, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 1),
            nn.Flatten(0),
        ),
        torch.randn(5, 2, 9, 9, dtype=torch.float64),
    ),
    # 3D imaging layers: strided and transposed convolutions, 3D group and instance norm, a skip connection
    "conv3d-unet": lambda: (_TinyUNet3d(), torch.randn(4, 1, 6, 8, 8, dtype=torch.float64)),
    # MONAI's own 3D networks as fedcare builds them: the default classifier (MONAI convolution
    # blocks), the DenseNet classifier and a GroupNorm U-Net
    "cnn3d": lambda: (build_model("cnn3d", (1, 8, 8, 6)), torch.randn(4, 1, 8, 8, 6, dtype=torch.float64)),
    "densenet3d": lambda: (
        build_model("densenet3d", (1, 16, 16, 16)),
        torch.randn(3, 1, 16, 16, 16, dtype=torch.float64),
    ),
    "monai-unet3d": lambda: (_monai_unet3d(), torch.randn(3, 1, 8, 8, 8, dtype=torch.float64)),
    "conv1d-transposed": lambda: (
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1),
            nn.ConvTranspose1d(3, 2, 4, stride=2, padding=1, output_padding=1, dilation=1),
            nn.InstanceNorm1d(2, affine=True),
            nn.Flatten(),
            nn.Linear(2 * 19, 1),
            nn.Flatten(0),
        ),
        torch.randn(5, 2, 9, dtype=torch.float64),
    ),
    "gru": lambda: (build_model("gru", (6, 5)), _sequences(9, 6, 4)),
    "gru-long": lambda: (build_model("gru", (40, 3)), _sequences(4, 40, 2)),  # more steps than weights
    # enough samples x steps that the (T, T) Gram products are taken a chunk of samples at a time
    "gru-chunked": lambda: (build_model("gru", (40, 3)), _sequences(23, 40, 2)),
}


def _monai_unet3d() -> nn.Module:
    """MONAI's UNet (residual units, strided and transposed convolutions, GroupNorm), one logit per volume."""
    from monai.networks.nets import UNet

    unet = UNet(3, 1, 1, channels=(4, 8), strides=(2,), num_res_units=1, norm=("group", {"num_groups": 1}), act="RELU")
    return nn.Sequential(unet, nn.Flatten(1), _Mean())


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class _TinyUNet3d(nn.Module):
    """A U-Net's parts in miniature: a strided 3D encoder, a transposed-convolution decoder, group and
    instance norm, and the skip connection that feeds one input to two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(1, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.down = nn.Conv3d(3, 4, 3, stride=2, padding=1, dilation=1)
        self.inorm = nn.InstanceNorm3d(4, affine=True)
        self.up = nn.ConvTranspose3d(4, 3, 2, stride=2)
        self.head = nn.Conv3d(6, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.norm(self.enc(x)))
        deep = torch.relu(self.inorm(self.down(skip)))
        joined = torch.cat([skip, self.up(deep)], dim=1)
        return self.head(joined).mean(dim=(1, 2, 3, 4))


def dp_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, flat: bool = True
) -> list[torch.Tensor]:
    """One DP-SGD step through fedcare's clipper; returns the clipped sums it started from.

    ``flat=False`` gives the gradients separate tensors (Opacus's own per-parameter path).
    """
    optimizer.zero_grad(set_to_none=True)
    clipper = PerSampleClipper(model, optimizer.max_grad_norm)
    with clipper.recording():
        loss = sample_losses(model(x), y).sum()
    clipper.clip_and_sum(loss, len(y))
    clipper.close()
    sums = [p.grad.detach().clone() for p in model.parameters()]
    if not flat:
        for p in model.parameters():
            p.grad = p.grad.clone()
    optimizer.step()
    return sums
