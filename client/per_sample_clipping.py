"""DP-SGD's clipped gradient sum in one forward and one backward pass.

DP-SGD needs sum_i clip(g_i), each sample's gradient g_i scaled to norm <= C. Opacus builds every
g_i with module hooks (an MLP step costs 15-44x a plain one on a CPU) or runs a second backward
pass (ghost clipping). Here the backward pass runs once and only as far as the layers' outputs
(autograd's engine, called as ``torch.autograd.grad`` calls it, to those outputs), so autograd never forms the unclipped weight gradient
nobody uses. From a layer's inputs A and output gradients G the per-sample norms follow in
closed form (||g a^T|| = ||g|| ||a|| for a single position, a Gram product over positions, or the
small per-sample gradient itself where that is cheaper), and the clipped sum is one more matrix
product with G scaled by each sample's clip factor.

The result goes to ``p.grad``; Opacus's ``DPOptimizerFastGradientClipping`` (its bookkeeping
batched in ``client/dp_optimizer.py``) then adds the noise, averages over the expected batch size
and reports the step to the accountant, exactly as for Opacus's own ghost clipping. Clip factors
follow Opacus: ``min(1, C / (||g_i|| + 1e-6))`` over all parameters together (flat clipping).

Supported layers: ``nn.Linear`` (any number of leading position dimensions, and called any
number of times in one forward pass, as a recurrent cell's hidden map is), ``nn.Conv2d``
(``groups=1``, zero padding) and ``nn.GroupNorm``. A model with any other parameterised layer is
refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedcare.errors import FedcareError

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm)
_AUTOGRAD_ENGINE = torch.autograd.Variable._execution_engine  # the engine torch.autograd.grad runs


@dataclass(slots=True)
class _Record:
    """One layer's inputs, outputs and output gradients for every call in the current step."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)


class PerSampleClipper:
    """Records a model's layers in a forward pass, then turns the summed loss into sum_i clip(g_i).

    ``with clipper.recording(): loss = per_sample_losses.sum()``, then
    ``clipper.clip_and_sum(loss, batch_size)`` leaves the clipped sum in every ``p.grad``.
    The loss must be *summed* over the batch, so each sample's output gradient is its own.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        if max_grad_norm <= 0:
            raise FedcareError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.max_grad_norm = float(max_grad_norm)
        self.layers: list[tuple[nn.Module, _Rule]] = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, SUPPORTED_LAYERS) or (isinstance(module, nn.Conv2d) and not _plain_conv(module)):
                raise FedcareError(
                    f"layer '{name}' ({type(module).__name__}) has no fast per-sample gradient rule",
                    "use Linear, Conv2d (groups=1, zero padding given in pixels) and GroupNorm layers, "
                    "or train without DP",
                )
            self.layers.append((module, next(r for kind, r in _RULES.items() if isinstance(module, kind))))
            covered.update(id(p) for p in own)
        self.params = [p for p in model.parameters() if p.requires_grad]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise FedcareError(f"parameters outside supported layers: {', '.join(missing)}",
                               "use Linear, Conv2d and GroupNorm layers, or train without DP")
        self._own_params = [[p for p in m.parameters(recurse=False) if p.requires_grad] for m, _ in self.layers]
        self._sizes = [p.numel() for p in self.params]
        self._records: dict[nn.Module, _Record] = {}
        self._recording = False
        self.last_norms: torch.Tensor | None = None  # per-sample gradient norms of the last step
        # Each layer's forward is wrapped once (an instance attribute over the class's forward):
        # a forward hook would send every call down nn.Module's slow path, and adding and
        # removing hooks every step costs as much as a small layer.
        # While wrapped, copy or pickle the model only after ``close()``.
        self._wrapped = [(m, m.__dict__.get("forward")) for m, _ in self.layers]
        for module, _ in self._wrapped:
            module.forward = self._recorder(module)

    def close(self) -> None:
        """Unwrap the layers: the model runs as if it had never been wrapped."""
        for module, own_forward in self._wrapped:
            if own_forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own_forward
        self._wrapped = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the inputs and outputs of every supported layer during a forward pass."""
        if not self._wrapped:
            raise RuntimeError("this PerSampleClipper was closed")
        self._records = {m: _Record() for m, _ in self.layers}
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def _recorder(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        forward = module.forward

        def recorded(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            output = forward(x, *args, **kwargs)
            if self._recording:
                record = self._records[module]
                record.inputs.append(x)  # read under no_grad only
                record.outputs.append(output)
            return output
        return recorded

    def clip_and_sum(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """One backward pass to the recorded outputs (never to the parameters), then write
        sum_i clip(g_i) into each parameter's ``.grad``; returns the per-sample norms.

        The gradients are views of one flat tensor (in ``model.parameters()`` order), so the
        optimizer can add the noise and average in one operation each."""
        records = self._records
        self._records = {}
        first = self.params[0]
        flat = torch.empty(sum(self._sizes), device=first.device, dtype=first.dtype)
        out = {}
        count = len(self.params)
        for index, (p, part) in enumerate(zip(self.params, flat.split_with_sizes(self._sizes))):
            view = part.view_as(p)
            view.clipped_sum_part = (index, count)  # tells ClippedSumDPOptimizer the views tile ``flat``
            p.grad = out[id(p)] = view
        if batch_size == 0:  # an empty Poisson batch: the step still happens, on noise alone
            flat.zero_()
            self.last_norms = torch.zeros(0)
            return self.last_norms
        wanted = [(r, i, o) for r in records.values() for i, o in enumerate(r.outputs) if o.requires_grad]
        grads = _grads_to(loss, tuple(o for _, _, o in wanted)) if wanted else ()
        for r in records.values():
            r.grads = [None] * len(r.outputs)
            r.outputs = []
        for (r, i, _), g in zip(wanted, grads):
            r.grads[i] = g
        del wanted, grads  # the records now hold the only references: rules can free as they go
        with torch.no_grad():
            parts = [rule(module, records[module], out) for module, rule in self.layers]
            squares = [sq for _, sq in parts if sq is not None]
            if not squares:  # no recorded layer reached the loss: every gradient is zero
                squares = [torch.zeros(batch_size, device=first.device, dtype=first.dtype)]
            norms = (torch.stack(squares).sum(0) if len(squares) > 1 else squares[0]).sqrt_()
            coef = (norms + 1e-6).reciprocal_().mul_(self.max_grad_norm).clamp_(max=1.0)  # min(1, C/(n+1e-6))
            column = coef.unsqueeze(1)
            for own, (summer, _) in zip(self._own_params, parts):
                if summer is not None:
                    summer(coef, column)
                else:  # the layer's outputs never reached the loss
                    for p in own:
                        out[id(p)].zero_()
        self.last_norms = norms
        return norms


def _grads_to(loss: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, outputs, allow_unused=True)`` for a scalar loss, called on
    autograd's engine directly: the wrapper's argument handling costs ~50 us a call on a CPU,
    a tenth of a small tabular model's whole step."""
    return _AUTOGRAD_ENGINE.run_backward((loss,), (torch.ones_like(loss),), False, False, outputs, True, False)


# Writes a layer's clipped sum into its gradient views, given the clip factors as (B,) and (B, 1).
_Summer = Callable[[torch.Tensor, torch.Tensor], None]
# (layer, its record, the gradient views by parameter id) -> (summer, per-sample squared norms)
_Rule = Callable[[nn.Module, "_Record", dict[int, torch.Tensor]], tuple[_Summer | None, torch.Tensor | None]]


def _plain_conv(module: nn.Conv2d) -> bool:
    return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _pairs(record: _Record) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output grad) for the calls whose output reached the loss."""
    return [(x, g) for x, g in zip(record.inputs, record.grads) if g is not None]


def _linear(module: nn.Linear, record: _Record, out_views: dict[int, torch.Tensor]):
    pairs = _pairs(record)
    if not pairs:
        return None, None
    bias = module.bias is not None and module.bias.requires_grad
    if len(pairs) == 1 and pairs[0][0].dim() == 2:   # one position per sample: ||g a^T|| = ||g|| ||a||
        a2, g2 = pairs[0]
        a_sq, g_sq = torch.linalg.vecdot(a2, a2), torch.linalg.vecdot(g2, g2)
        sq = torch.addcmul(g_sq, g_sq, a_sq) if bias else g_sq * a_sq
        weight, scale_g = out_views[id(module.weight)], g2.shape[1] <= a2.shape[1]

        def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
            # scale whichever side is narrower: the product is the same, the temporary smaller
            if scale_g:
                scaled = g2 * column
                torch.mm(scaled.t(), a2, out=weight)
                if bias:
                    torch.sum(scaled, 0, out=out_views[id(module.bias)])
            else:
                g2t = g2.t()
                torch.mm(g2t, a2 * column, out=weight)
                if bias:
                    torch.mv(g2t, coef, out=out_views[id(module.bias)])
        return summer, sq
    batch = pairs[0][0].shape[0]
    a = _positions([x for x, _ in pairs], batch)                                 # (B, T, in)
    g = _positions([y for _, y in pairs], batch)                                 # (B, T, out)
    del pairs
    record.inputs, record.grads = [], []  # per-call tensors, now copied into a and g (or viewed)
    positions, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    gb = g.sum(1) if bias else None                                              # (B, out)
    if positions * positions < d_in * d_out:
        # Gram form: ||sum_t g_t a_t^T||^2 = sum_{t,s} (g_t . g_s)(a_t . a_s)
        sq = torch.linalg.vecdot(torch.bmm(g, g.transpose(1, 2)).flatten(1), torch.bmm(a, a.transpose(1, 2)).flatten(1))

        def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
            # scale whichever side is narrower: the product is the same, the temporary smaller
            if d_in <= d_out:
                torch.mm(g.reshape(-1, d_out).t(), (a * column.unsqueeze(2)).reshape(-1, d_in),
                         out=out_views[id(module.weight)])
            else:
                torch.mm((g * column.unsqueeze(2)).reshape(-1, d_out).t(), a.reshape(-1, d_in),
                         out=out_views[id(module.weight)])
            if bias:
                torch.mv(gb.t(), coef, out=out_views[id(module.bias)])
    else:
        per_sample = torch.bmm(g.transpose(1, 2), a)                             # (B, out, in)
        sq = per_sample.pow(2).sum((1, 2))

        def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
            torch.mv(per_sample.flatten(1).t(), coef, out=out_views[id(module.weight)].view(-1))
            if bias:
                torch.mv(gb.t(), coef, out=out_views[id(module.bias)])
    if bias:
        sq = sq + gb.pow(2).sum(1)
    return summer, sq


def _positions(tensors: list[torch.Tensor], batch: int) -> torch.Tensor:
    """(B, positions, features) from one call's (B, ..., features) or many calls' (B, features)."""
    if len(tensors) == 1:
        return tensors[0].reshape(batch, -1, tensors[0].shape[-1])  # a view where the layout allows
    if all(t.dim() == 2 for t in tensors):
        return torch.stack(tensors, dim=1)
    return torch.cat([t.reshape(batch, -1, t.shape[-1]) for t in tensors], dim=1)


def _conv2d(module: nn.Conv2d, record: _Record, out_views: dict[int, torch.Tensor]):
    pairs = _pairs(record)
    if not pairs:
        return None, None
    per_sample_w, per_sample_b = None, None
    bias = module.bias is not None and module.bias.requires_grad
    for x, g in pairs:
        # Every sample's weight gradient at once: the batch becomes the groups of one grouped
        # convolution's weight gradient (several times faster on a CPU than unfold + bmm).
        batch, c_in, c_out = x.shape[0], x.shape[1], g.shape[1]
        w = torch.nn.grad.conv2d_weight(
            x.reshape(1, batch * c_in, *x.shape[2:]), (batch * c_out, c_in, *module.kernel_size),
            g.reshape(1, batch * c_out, *g.shape[2:]), stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=batch,
        ).reshape(batch, -1)                                                     # (B, out*C*k*k)
        per_sample_w = w if per_sample_w is None else per_sample_w + w
        if bias:
            b = g.sum((2, 3))
            per_sample_b = b if per_sample_b is None else per_sample_b + b
    sq = torch.linalg.vecdot(per_sample_w, per_sample_w)
    if bias:
        sq = sq + torch.linalg.vecdot(per_sample_b, per_sample_b)

    def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
        torch.mv(per_sample_w.t(), coef, out=out_views[id(module.weight)].view(-1))
        if bias:
            torch.mv(per_sample_b.t(), coef, out=out_views[id(module.bias)])
    return summer, sq


def _group_norm(module: nn.GroupNorm, record: _Record, out_views: dict[int, torch.Tensor]):
    pairs = _pairs(record)
    if not pairs:
        return None, None
    gamma, beta = None, None
    for x, g in pairs:
        normed = F.group_norm(x, module.num_groups, eps=module.eps)
        dims = tuple(range(2, x.dim()))
        w = (g * normed).sum(dims) if dims else g * normed                       # (B, C)
        b = g.sum(dims) if dims else g
        gamma = w if gamma is None else gamma + w
        beta = b if beta is None else beta + b
    weight = module.weight is not None and module.weight.requires_grad
    bias = module.bias is not None and module.bias.requires_grad
    sq = (gamma.pow(2).sum(1) if weight else 0.0) + (beta.pow(2).sum(1) if bias else 0.0)

    def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
        if weight:
            torch.mv(gamma.t(), coef, out=out_views[id(module.weight)])
        if bias:
            torch.mv(beta.t(), coef, out=out_views[id(module.bias)])
    return summer, sq


_RULES = {nn.Linear: _linear, nn.Conv2d: _conv2d, nn.GroupNorm: _group_norm}
