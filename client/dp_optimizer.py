"""Opacus's DP optimizer for pre-clipped gradient sums, with its per-parameter bookkeeping batched.

``PerSampleClipper`` leaves sum_i clip(g_i) in ``p.grad``. Opacus's
``DPOptimizerFastGradientClipping`` turns that into the DP-SGD update,
``(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / expected_batch_size``, and reports (sigma, sample rate)
to the accountant through its step hook. For a small model its Python bookkeeping costs more than
the model's own step: a deep copy of every gradient, one noise draw and one division per
parameter. This subclass keeps every rule (the processed-gradient checks, skipped steps, the step
hook) and only batches the work: the clipper's fresh ``p.grad`` is taken over without a copy, and
when the gradients are views of one flat tensor (as the clipper writes them) the noise is one draw of
i.i.d. N(0, (sigma C)^2) values for all parameters -- the same distribution as Opacus's
per-parameter draws -- added to that tensor in place and averaged in one operation each.

The noise never comes from a torch generator: it is drawn from the hospital's secret stream
(``client/secret_randomness.py``: OS entropy, AES-256-CTR, Opacus's secure-mode Gaussian), so no
seed the coordinator knows reproduces it.

The Opacus internals this relies on are in ``fedcare/compat/opacus.py``, verified on Opacus 1.6.0;
``make_dp_optimizer`` builds this optimizer there and Opacus's public one on any other version.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping

from client.secret_randomness import SecretRandom
from fedcare.compat import opacus as opacus_compat
from fedcare.compat.opacus import check_processed_flag, mark_as_processed


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer, *, noise: SecretRandom, **kwargs
) -> DPOptimizerFastGradientClipping:
    """The DP optimizer for ``PerSampleClipper``'s clipped sums: ``ClippedSumDPOptimizer`` on the verified
    Opacus, Opacus's public ``DPOptimizerFastGradientClipping`` step on any other (one warning), both
    with noise from ``noise``. ``kwargs``: Opacus's (noise_multiplier, max_grad_norm, ...)."""
    if opacus_compat.opacus_verified():
        return ClippedSumDPOptimizer(optimizer, noise=noise, **kwargs)
    return opacus_compat.public_dp_optimizer(optimizer, noise=noise, **kwargs)


class ClippedSumDPOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` whose noise and averaging run once for all parameters.

    ``noise``: where the Gaussian noise comes from (default: a fresh secret stream from OS entropy).
    """

    _noisy_flat: torch.Tensor | None = None  # this step's noisy gradients, when they share one tensor

    def __init__(self, *args, noise: SecretRandom | None = None, **kwargs) -> None:
        opacus_compat.require_verified("ClippedSumDPOptimizer")
        super().__init__(*args, **kwargs)
        self.noise = noise if noise is not None else SecretRandom()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Opacus's zero_grad (``summed_grad`` cleared unless the last step was skipped) with the
        wrapped optimizer's ``set_to_none`` pass done here: the same ``p.grad = None`` for every
        parameter, without its per-call profiler annotation, which costs as much as a small layer."""
        if not set_to_none:
            super().zero_grad(set_to_none)
            return
        keep_sums = opacus_compat.last_step_skipped(self)
        for p in self.params:
            if not keep_sums:
                p.summed_grad = None
            p.grad = None

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = p.grad  # written fresh by the clipper; add_noise replaces p.grad
            else:
                p.summed_grad.add_(p.grad)  # in place, as Opacus does: a used gradient stays marked

    def add_noise(self) -> None:
        params = self.params
        sigma = opacus_compat.noise_multiplier_in_use(self)
        std = sigma * self.max_grad_norm
        flat = _shared_flat([p.summed_grad for p in params])
        if flat is None:  # Opacus's per-parameter loop, with the secret noise
            self._noisy_flat = None
            for p in params:
                check_processed_flag(p.summed_grad)
                p.grad = (p.summed_grad + self.noise.gaussian_like(p.summed_grad, std)).view_as(p)
                mark_as_processed(p.summed_grad)
            return
        check_processed_flag(flat)  # Opacus's reuse check, on the buffer all the gradients share
        if std > 0:  # in place: the clipped sums are this step's own buffer, nothing else reads them
            self.noise.add_gaussian_(flat, std)
        for p in params:
            if p.grad is not p.summed_grad:
                p.grad = p.summed_grad
        mark_as_processed(flat)
        self._noisy_flat = flat

    def scale_grad(self) -> None:
        if self.loss_reduction != "mean":
            return
        denominator = self.expected_batch_size * self.accumulated_iterations
        if self._noisy_flat is not None:
            self._noisy_flat.div_(denominator)  # every p.grad is a view of it
            self._noisy_flat = None
        else:
            torch._foreach_div_([p.grad for p in self.params], denominator)


def _shared_flat(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D tensor ``grads`` tile in order, start to end, when ``PerSampleClipper`` wrote them
    so (it lists the views it hands out on that tensor); otherwise None."""
    base = grads[0]._base if grads else None
    views = getattr(base, "clipped_sum_views", None)
    if views is None or len(views) != len(grads):
        return None
    for g, view in zip(grads, views):
        if g._base is not base or id(g) != view:
            return None
    return base
