"""Opacus's DP optimizer for pre-clipped gradient sums, with its per-parameter bookkeeping batched.

``PerSampleClipper`` leaves sum_i clip(g_i) in ``p.grad``. Opacus's
``DPOptimizerFastGradientClipping`` turns that into the DP-SGD update,
``(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / expected_batch_size``, and reports (sigma, sample rate)
to the accountant through its step hook. For a small model its Python bookkeeping costs more than
the model's own step: a deep copy of every gradient, one noise draw and one division per
parameter. This subclass keeps every rule (the processed-gradient checks, skipped steps, the step
hook, secure mode) and only batches the work: the clipper's fresh ``p.grad`` is taken over without
a copy, and when the gradients are views of one flat tensor (as the clipper writes them) the noise
is one draw of i.i.d. N(0, (sigma C)^2) values for all parameters -- the same distribution as
Opacus's per-parameter draws -- added to that tensor in place and averaged in one operation each.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed


class ClippedSumDPOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` whose noise and averaging run once for all parameters."""

    _noisy_flat: torch.Tensor | None = None  # this step's noisy gradients, when they share one tensor

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Opacus's zero_grad (``summed_grad`` cleared unless the last step was skipped) with the
        wrapped optimizer's ``set_to_none`` pass done here: the same ``p.grad = None`` for every
        parameter, without its per-call profiler annotation, which costs as much as a small layer."""
        if not set_to_none:
            super().zero_grad(set_to_none)
            return
        keep_sums = self._is_last_step_skipped
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
        flat = None if self.secure_mode else _shared_flat([p.summed_grad for p in params])
        if flat is None:
            self._noisy_flat = None
            super().add_noise()
            return
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = sigma * self.max_grad_norm
        _check_processed_flag(flat)  # Opacus's reuse check, on the buffer all the gradients share
        if std > 0:  # in place: the clipped sums are this step's own buffer, nothing else reads them
            flat.add_(torch.normal(mean=0.0, std=std, size=flat.shape, device=flat.device, dtype=flat.dtype,
                                   generator=self.generator))
        for p in params:
            if p.grad is not p.summed_grad:
                p.grad = p.summed_grad
        _mark_as_processed(flat)
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
