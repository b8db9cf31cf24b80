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
number of times in one forward pass), convolutions in 1, 2 or 3 dimensions, plain or transposed
(``groups=1``, zero padding), ``nn.GroupNorm``, affine ``nn.InstanceNorm1d/2d/3d`` and the masked
GRU's ``GRUGates``. A model with any other parameterised layer is refused.

A sample may span several rows of the batch (``rows_per_sample``): patch-based 3D training feeds
each patient's patches as consecutive rows, and the privacy unit stays the patient, so the
gradient clipped is the sum over the patient's rows (``client/volume_patches.py``). The rules then
sum each layer's per-row gradients (or merge its positions) over the rows of a sample before the
norm.

``GRUGates`` is handled as one layer: the backward pass stops at its input map's output (the
gate pre-activations of every time step, one tensor), and the hidden map's output gradients are
derived from those: for the r and z gates they are the same values, for the candidate gate they
are scaled by r, recomputed over all steps in one product. So no gradient is kept per time step
and call, and the hidden map's inputs are the only per-step record.

The torch internals used for speed (autograd's engine, gradient edges built directly, reference
counts for buffer reuse) are in ``fedcare/compat/torch.py``, verified on torch 2.13.x; on any other
torch their public equivalents run instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge

from fedcare.compat.torch import clipping_internals
from fedcare.errors import FedcareError
from shared_models.sequence_gru import GRUGates

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
SUPPORTED_LAYERS = (nn.Linear, *CONVOLUTIONS, nn.GroupNorm, *INSTANCE_NORMS, GRUGates)


@dataclass(slots=True)
class _Record:
    """One layer's inputs, outputs and output gradients for every call in the current step."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[GradientEdge | None] = field(default_factory=list)  # None: the output needs no gradient
    grads: list[torch.Tensor | None] = field(default_factory=list)
    inputs_only: bool = False  # a map whose output gradients its composite layer derives itself


class PerSampleClipper:
    """Records a model's layers in a forward pass, then turns the summed loss into sum_i clip(g_i).

    ``with clipper.recording(): loss = per_sample_losses.sum()``, then
    ``clipper.clip_and_sum(loss, batch_size)`` leaves the clipped sum in every ``p.grad``.
    The loss must be *summed* over the batch, so each sample's output gradient is its own.
    With ``rows_per_sample`` = k, rows k*i .. k*i + k - 1 of every layer's batch are sample i
    (``batch_size`` still counts samples).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, rows_per_sample: int = 1) -> None:
        if max_grad_norm <= 0:
            raise FedcareError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if rows_per_sample < 1:
            raise FedcareError(f"rows_per_sample must be >= 1, got {rows_per_sample}")
        self.max_grad_norm = float(max_grad_norm)
        self.rows_per_sample = int(rows_per_sample)
        self._torch = clipping_internals()  # torch's internals, or their public equivalents on another torch
        self.layers, covered = _supported_layers(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise FedcareError(
                f"parameters outside supported layers: {', '.join(missing)}",
                "use Linear, convolution, GroupNorm and InstanceNorm layers, or train without DP",
            )
        self._own_params = [
            [p for p in m.parameters(recurse=isinstance(m, GRUGates)) if p.requires_grad] for m, _ in self.layers
        ]
        self._sizes = [p.numel() for p in self.params]
        self._shapes = [p.shape for p in self.params]
        self._param_ids = [id(p) for p in self.params]
        self._records: dict[nn.Module, _Record] = {}
        self._recording = False
        self.last_norms: torch.Tensor | None = None  # per-sample gradient norms of the last step
        self._buffer: tuple[torch.Tensor, list[torch.Tensor], dict[int, torch.Tensor], list[int]] | None = None
        # What is recorded: each layer, or a GRU's two maps; the hidden map only its inputs.
        recorded: list[tuple[nn.Module, bool]] = []
        for module, _ in self.layers:
            recorded += [(module.ih, False), (module.hh, True)] if isinstance(module, GRUGates) else [(module, False)]
        self._inputs_only = {id(m) for m, only in recorded if only}
        # Each recorded module's forward is wrapped once (an instance attribute over the class's
        # forward): a forward hook would send every call down nn.Module's slow path, and adding and
        # removing hooks every step costs as much as a small layer.
        # While wrapped, copy or pickle the model only after ``close()``.
        self._wrapped = [(m, m.__dict__.get("forward")) for m, _ in recorded]
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
        self._records = {m: _Record(inputs_only=id(m) in self._inputs_only) for m, _ in self._wrapped}
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def _recorder(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        forward = module.forward
        edge = self._torch.edge

        def recorded(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            output = forward(x, *args, **kwargs)
            if self._recording:
                record = self._records[module]
                record.inputs.append(x)  # read under no_grad only
                if not record.inputs_only:
                    # the output's place in the graph, not the output: nothing keeps its values alive
                    record.outputs.append(edge(output) if output.requires_grad else None)
            return output

        return recorded

    def clip_and_sum(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """One backward pass to the recorded outputs (never to the parameters), then write
        sum_i clip(g_i) into each parameter's ``.grad``; returns the per-sample norms.

        The gradients are views of one flat tensor (in ``model.parameters()`` order), so the
        optimizer can add the noise and average in one operation each."""
        records = self._records
        self._records = {}
        flat, views, out = self._gradient_buffer()
        for p, view in zip(self.params, views):
            p.grad = view
        if batch_size == 0:  # an empty Poisson batch: the step still happens, on noise alone
            flat.zero_()
            self.last_norms = torch.zeros(0)
            return self.last_norms
        wanted = [(r, i, o) for r in records.values() for i, o in enumerate(r.outputs) if o is not None]
        grads = self._torch.grads_to(loss, tuple(o for _, _, o in wanted)) if wanted else ()
        for r in records.values():
            r.grads = [None] * len(r.outputs)
            r.outputs = []
        for (r, i, _), g in zip(wanted, grads):
            r.grads[i] = g
        del wanted, grads  # the records now hold the only references: rules can free as they go
        with torch.no_grad():
            rows = self.rows_per_sample
            parts = [rule(module, records, out, rows) for module, rule in self.layers]
            squares = [sq for _, sq in parts if sq is not None]
            if not squares:  # no recorded layer reached the loss: every gradient is zero
                squares = [torch.zeros(batch_size, device=flat.device, dtype=flat.dtype)]
            norms = (torch.stack(squares).sum(0) if len(squares) > 1 else squares[0]).sqrt_()
            coef = (norms + 1e-6).reciprocal_()  # min(1, C/(n+1e-6)); C = 1 (the default) needs no product
            if self.max_grad_norm != 1.0:
                coef.mul_(self.max_grad_norm)
            coef.clamp_(max=1.0)
            column = coef.unsqueeze(1)
            for own, (summer, _) in zip(self._own_params, parts):
                if summer is not None:
                    summer(coef, column)
                else:  # the layer's outputs never reached the loss
                    for p in own:
                        out[id(p)].zero_()
        self.last_norms = norms
        return norms

    def _gradient_buffer(self) -> tuple[torch.Tensor, list[torch.Tensor], dict[int, torch.Tensor]]:
        """The flat gradient tensor, its per-parameter views and those views by parameter id.

        Last step's buffer is reused when no Python object but this clipper still refers to it
        (the optimizer's ``zero_grad`` dropped its sums; ``p.grad`` is reassigned anyway): every
        value is rewritten, and building the views costs as much as a small layer. While anything
        else still holds last step's gradients, a fresh buffer is made instead.
        """
        reference_counts = self._torch.reference_counts  # None: no reuse (another torch)
        if self._buffer is not None and reference_counts is not None:
            flat, views, out, free = self._buffer
            if reference_counts(flat, views) == free:
                for used in (flat, *views):  # Opacus's used-once mark of last step's gradients
                    used.__dict__.pop("_processed", None)
                return flat, views, out
        first = self.params[0]
        flat = torch.empty(sum(self._sizes), device=first.device, dtype=first.dtype)
        views = [part.view(shape) for part, shape in zip(flat.split_with_sizes(self._sizes), self._shapes)]
        # tells ClippedSumDPOptimizer the views tile ``flat`` (torch's stub declares no Python attributes on tensors)
        flat.clipped_sum_views = tuple(map(id, views))  # type: ignore[attr-defined]
        out = dict(zip(self._param_ids, views))
        free = []
        self._buffer = (flat, views, out, free)
        # counted with the same bindings as in the check above, so equal means: nothing else refers
        if reference_counts is not None:
            free.extend(reference_counts(flat, views))
        return flat, views, out


def _supported_layers(model: nn.Module) -> tuple[list[tuple[nn.Module, _Rule]], set[int]]:
    """Each parameterised layer with its per-sample rule, and the ids of the parameters they cover;
    a layer without a rule is refused by name."""
    layers: list[tuple[nn.Module, _Rule]] = []
    covered: set[int] = set()
    inside: set[int] = set()  # the parts of a composite layer, recorded for it
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, GRUGates):
            inside.update(id(m) for m in module.modules())
            own = [p for p in module.parameters() if p.requires_grad]
            if own and len(own) != len(list(module.parameters())):
                raise FedcareError(
                    f"layer '{name}' (GRUGates) has some parameters frozen",
                    "train all of a GRU cell's parameters or none of them",
                )
        else:
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, SUPPORTED_LAYERS) or (isinstance(module, CONVOLUTIONS) and not _plain_conv(module)):
            raise FedcareError(
                f"layer '{name}' ({type(module).__name__}) has no fast per-sample gradient rule",
                "use Linear, convolutions (1D/2D/3D, transposed too; groups=1, zero padding given in "
                "pixels), GroupNorm and InstanceNorm layers, or train without DP",
            )
        layers.append((module, cast(_Rule, next(r for kind, r in _RULES.items() if isinstance(module, kind)))))
        covered.update(id(p) for p in own)
    return layers, covered


# Writes a layer's clipped sum into its gradient views, given the clip factors as (B,) and (B, 1).
_Summer = Callable[[torch.Tensor, torch.Tensor], None]
# (layer, the records by module, the gradient views by parameter id, rows per sample)
#   -> (summer, per-sample squared norms)
_Rule = Callable[
    [nn.Module, dict[nn.Module, "_Record"], dict[int, torch.Tensor], int],
    tuple[_Summer | None, torch.Tensor | None],
]


def _per_sample(per_row: torch.Tensor, rows: int) -> torch.Tensor:
    """(B * rows, ...) per-row gradients -> (B, ...): each sample's the sum over its rows."""
    return per_row if rows == 1 else per_row.view(-1, rows, *per_row.shape[1:]).sum(1)


def _plain_conv(module: nn.Module) -> bool:
    return (
        module.groups == 1  # type: ignore[return-value]  # a convolution's attributes
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _pairs(record: _Record) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output grad) for the calls whose output reached the loss."""
    return [(x, g) for x, g in zip(record.inputs, record.grads) if g is not None]


def _linear(module: nn.Linear, records: dict[nn.Module, _Record], out_views: dict[int, torch.Tensor], rows: int = 1):
    record = records[module]
    pairs = _pairs(record)
    if not pairs:
        return None, None
    bias = module.bias is not None and module.bias.requires_grad
    if len(pairs) == 1 and pairs[0][0].dim() == 2 and rows == 1:  # one position per sample: ||g a^T|| = ||g|| ||a||
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
    a = _positions([x for x, _ in pairs], batch)  # (B * rows, T, in)
    g = _positions([y for _, y in pairs], batch)  # (B * rows, T, out)
    del pairs
    if rows > 1:  # a sample's rows are more positions of the same sample
        a, g = a.reshape(batch // rows, -1, a.shape[2]), g.reshape(batch // rows, -1, g.shape[2])
    record.inputs, record.grads = [], []  # per-call tensors, now copied into a and g (or viewed)
    return _over_positions(a, g, out_views[id(module.weight)], out_views[id(module.bias)] if bias else None)


def _over_positions(
    a: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[_Summer, torch.Tensor]:
    """A linear map applied at T positions per sample, inputs ``a`` (B, T, in) and output
    gradients ``g`` (B, T, out), both possibly strided views: each sample's squared gradient norm,
    and the summer writing sum_i clip_i sum_t g_it a_it^T into ``weight`` (and sum_t g_it into
    ``bias``)."""
    positions, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    gb: Any = g.sum(1) if bias is not None else None  # (B, out)
    a2, g2 = a.flatten(0, 1), g.flatten(0, 1)  # views of (B*T, ...)
    if positions * positions < d_in * d_out:
        sq = _gram_norms(a, g)

        def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
            # scale whichever side is narrower: the product is the same, the temporary smaller
            if d_in <= d_out:
                torch.mm(g2.t(), (a * column.unsqueeze(2)).flatten(0, 1), out=weight)
            else:
                torch.mm((g * column.unsqueeze(2)).flatten(0, 1).t(), a2, out=weight)
            if bias is not None:
                torch.mv(gb.t(), coef, out=bias)
    else:
        per_sample = torch.bmm(g.transpose(1, 2), a)  # (B, out, in)
        sq = per_sample.pow(2).sum((1, 2))

        def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
            torch.mv(per_sample.flatten(1).t(), coef, out=weight.view(-1))
            if bias is not None:
                torch.mv(gb.t(), coef, out=bias)

    if bias is not None:
        sq = sq + gb.pow(2).sum(1)
    return summer, sq


def _gram_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per sample ||sum_t g_t a_t^T||^2 = sum_{t,s} (g_t . g_s)(a_t . a_s), over chunks of samples
    so that the (T, T) Gram matrices in flight stay near ``_GRAM_ELEMENTS`` values, not B T^2."""
    batch, positions = a.shape[0], a.shape[1]
    chunk = max(1, _GRAM_ELEMENTS // (positions * positions))
    if chunk >= batch:
        return torch.linalg.vecdot(
            torch.bmm(g, g.transpose(1, 2)).flatten(1), torch.bmm(a, a.transpose(1, 2)).flatten(1)
        )
    return torch.cat([_gram_norms(a[i : i + chunk], g[i : i + chunk]) for i in range(0, batch, chunk)])


_GRAM_ELEMENTS = 16384


def _positions(tensors: list[torch.Tensor], batch: int) -> torch.Tensor:
    """(B, positions, features) from one call's (B, ..., features) or many calls' (B, features)."""
    if len(tensors) == 1:
        return tensors[0].reshape(batch, -1, tensors[0].shape[-1])  # a view where the layout allows
    if all(t.dim() == 2 for t in tensors):
        return torch.stack(tensors, dim=1)
    return torch.cat([t.reshape(batch, -1, t.shape[-1]) for t in tensors], dim=1)


# a convolution's weight gradient by its spatial dimensions (torch.nn.grad; its stub omits the module)
_CONV_WEIGHT = {
    1: torch.nn.grad.conv1d_weight,  # type: ignore[attr-defined]
    2: torch.nn.grad.conv2d_weight,  # type: ignore[attr-defined]
    3: torch.nn.grad.conv3d_weight,  # type: ignore[attr-defined]
}


def _conv(module: nn.Module, records: dict[nn.Module, _Record], out_views: dict[int, torch.Tensor], rows: int = 1):
    """Convolutions of any dimension, plain or transposed. Every sample's weight gradient at once: the
    batch becomes the groups of one grouped convolution's weight gradient (several times faster on a
    CPU than unfold + bmm). A transposed convolution's weight gradient is the weight gradient of the
    convolution it is the adjoint of: its output gradient as that convolution's input, its input as
    that convolution's output gradient."""
    record = records[module]
    pairs = _pairs(record)
    if not pairs:
        return None, None
    conv = cast(nn.modules.conv._ConvNd, module)
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    per_sample_w: Any = None
    per_sample_b: Any = None
    bias = conv.bias is not None and conv.bias.requires_grad
    for x, g in pairs:
        source, target = (g, x) if transposed else (x, g)  # the weight gradient's input and output gradient
        batch, c_source, c_target = x.shape[0], source.shape[1], target.shape[1]
        w = _CONV_WEIGHT[x.dim() - 2](
            source.reshape(1, batch * c_source, *source.shape[2:]),
            (batch * c_target, c_source, *conv.kernel_size),
            target.reshape(1, batch * c_target, *target.shape[2:]),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=batch,
        ).reshape(batch, -1)  # (B, weight size)
        per_sample_w = w if per_sample_w is None else per_sample_w + w
        if bias:
            b = g.sum(tuple(range(2, g.dim())))
            per_sample_b = b if per_sample_b is None else per_sample_b + b
    per_sample_w = _per_sample(per_sample_w, rows)
    if bias:
        per_sample_b = _per_sample(per_sample_b, rows)
    sq = torch.linalg.vecdot(per_sample_w, per_sample_w)
    if bias:
        sq = sq + torch.linalg.vecdot(per_sample_b, per_sample_b)

    def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
        torch.mv(per_sample_w.t(), coef, out=out_views[id(conv.weight)].view(-1))
        if bias:
            torch.mv(per_sample_b.t(), coef, out=out_views[id(conv.bias)])

    return summer, sq


def _group_norm(
    module: nn.Module, records: dict[nn.Module, _Record], out_views: dict[int, torch.Tensor], rows: int = 1
):
    """GroupNorm and InstanceNorm (GroupNorm with one channel per group): per-sample gradients of the
    affine scale and shift are sums over positions of the output gradient (times the normalised input)."""
    record = records[module]
    pairs = _pairs(record)
    if not pairs:
        return None, None
    gamma: Any = None
    beta: Any = None
    for x, g in pairs:
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else x.shape[1]
        normed = F.group_norm(x, groups, eps=cast(float, module.eps))
        dims = tuple(range(2, x.dim()))
        w = (g * normed).sum(dims) if dims else g * normed  # (B, C)
        b = g.sum(dims) if dims else g
        gamma = w if gamma is None else gamma + w
        beta = b if beta is None else beta + b
    gamma, beta = _per_sample(gamma, rows), _per_sample(beta, rows)
    weight = module.weight is not None and module.weight.requires_grad
    bias = module.bias is not None and module.bias.requires_grad
    sq = (gamma.pow(2).sum(1) if weight else 0.0) + (beta.pow(2).sum(1) if bias else 0.0)

    def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
        if weight:
            torch.mv(gamma.t(), coef, out=out_views[id(module.weight)])
        if bias:
            torch.mv(beta.t(), coef, out=out_views[id(module.bias)])

    return summer, sq


def _gru_gates(module: GRUGates, records: dict[nn.Module, _Record], out_views: dict[int, torch.Tensor], rows: int = 1):
    if rows != 1:
        raise FedcareError(
            "a GRU's per-sample gradients are one sequence per sample",
            "train sequence models with one row per patient (patches are for 3D volumes)",
        )
    ih, hh, hidden = module.ih, module.hh, module.hidden
    pairs = _pairs(records[ih])
    if not pairs:
        return None, None
    batch = pairs[0][0].shape[0]
    x = _positions([a for a, _ in pairs], batch)  # (B, T, d) step inputs
    g = _positions([y for _, y in pairs], batch)  # (B, T, 3H) gate pre-activations
    del pairs
    hh_inputs = records[hh].inputs
    if len(hh_inputs) != g.shape[1]:
        raise FedcareError(
            f"GRUGates: the hidden map ran {len(hh_inputs)} times for {g.shape[1]} input steps",
            "call the cell's step once per time step of its input map's output",
        )
    records[ih].inputs, records[ih].grads = [], []
    sq = _summed_map_sq(x, g)
    h = torch.stack(hh_inputs, 1)  # (B, T, H): h_{t-1}
    records[hh].inputs = []
    # The hidden map's output gradients: for the r and z rows g's own, for the candidate's rows
    # g's times r, recomputed here for all steps at once (in the buffer that then holds the product).
    r_rows, rz, candidate = slice(0, hidden), slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
    g_candidate = torch.addmm(ih.bias[r_rows], x.flatten(0, 1), ih.weight[r_rows].t())
    g_candidate.addmm_(h.flatten(0, 1), hh.weight[r_rows].t()).add_(hh.bias[r_rows]).sigmoid_()
    g_candidate = g_candidate.view_as(h).mul_(g[..., candidate])  # (B, T, H)
    sq += _summed_map_sq(h, g[..., rz]) + _summed_map_sq(h, g_candidate)

    def summer(coef: torch.Tensor, column: torch.Tensor) -> None:
        # Scaled in place, so the products need no temporary: g is the input map's output gradient
        # as the backward pass returned it (the time steps' gradients stacked into a tensor of its
        # own) and g_candidate was made here; nothing reads either unscaled any more.
        scale = column.unsqueeze(2)
        g.mul_(scale)
        g_candidate.mul_(scale)
        x2, h2, g2 = x.flatten(0, 1), h.flatten(0, 1), g.flatten(0, 1)
        torch.mm(g2.t(), x2, out=out_views[id(ih.weight)])
        torch.sum(g2, 0, out=out_views[id(ih.bias)])
        torch.mm(g2[:, rz].t(), h2, out=out_views[id(hh.weight)][rz])
        torch.sum(g2[:, rz], 0, out=out_views[id(hh.bias)][rz])
        torch.mm(g_candidate.flatten(0, 1).t(), h2, out=out_views[id(hh.weight)][candidate])
        torch.sum(g_candidate.flatten(0, 1), 0, out=out_views[id(hh.bias)][candidate])

    return summer, sq


def _summed_map_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per sample, the squared norm of a linear map's gradient over T positions with a bias:
    ||sum_t g_t a_t^T||^2 + ||sum_t g_t||^2, for inputs ``a`` (B, T, in) and output gradients
    ``g`` (B, T, out)."""
    if a.shape[1] ** 2 < a.shape[2] * g.shape[2]:
        sq = _gram_norms(a, g)
    else:
        sq = torch.bmm(g.transpose(1, 2), a).pow_(2).sum((1, 2))
    return sq.add_(g.sum(1).pow_(2).sum(1))


_RULES: dict[type[nn.Module], Any] = {
    nn.Linear: _linear,
    **dict.fromkeys(CONVOLUTIONS, _conv),
    nn.GroupNorm: _group_norm,
    **dict.fromkeys(INSTANCE_NORMS, _group_norm),
    GRUGates: _gru_gates,
}
