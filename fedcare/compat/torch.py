"""fedcare's use of torch internals (and CPython reference counts), verified on torch 2.13.x (gate: ``torch_verified``).

``client/per_sample_clipping.py`` runs one backward pass to its layers' outputs. For speed it uses:

- autograd's engine directly (``torch.autograd.Variable._execution_engine.run_backward``, with the
  positional arguments ``torch.autograd.grad`` passes it): the public wrapper's argument handling
  costs ~50 us a call on a CPU, a tenth of a small tabular model's whole step;
- ``GradientEdge(output.grad_fn, output.output_nr)`` built directly, except for custom functions
  (``torch._C._FunctionBase``), instead of ``get_gradient_edge``'s checks;
- ``sys.getrefcount`` on its flat gradient buffer and views, to reuse last step's buffer when
  nothing else refers to it (which depends on which references torch's tensors keep).

On another torch, ``clipping_internals`` selects the public equivalents, with ONE warning per
process: ``torch.autograd.grad(loss, edges, allow_unused=True)``, ``get_gradient_edge`` and a fresh
gradient buffer every step. The clipped sums are the same; a small model's step is slower.
Contract tests: tests/test_compat.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from fedcare.compat import installed_version, unverified_message, warn_once

VERIFIED_TORCH = "2.13"  # any 2.13.x release (local builds: "2.13.0+cpu", "2.13.1+cu128", ...)
FALLBACK = (
    "per-sample clipping uses torch.autograd.grad, get_gradient_edge and a fresh gradient buffer per step "
    "(the same sums, slower)"
)


def torch_version() -> str:
    """The installed torch's version, from its package metadata."""
    return installed_version("torch")


def torch_verified() -> bool:
    """Whether the installed torch is a verified 2.13.x; otherwise one warning per process, and False."""
    found = torch_version()
    if found.split("+")[0].split(".")[:2] == VERIFIED_TORCH.split("."):
        return True
    warn_once("torch", unverified_message("torch", VERIFIED_TORCH + ".x", found, FALLBACK))
    return False


@dataclass(frozen=True)
class ClippingInternals:
    """What ``PerSampleClipper`` calls: the backward pass to recorded outputs, an output's place in the
    graph, and the reference counts that allow reusing a buffer (None: never reuse it)."""

    grads_to: Callable[[torch.Tensor, tuple[GradientEdge, ...]], tuple[torch.Tensor | None, ...]]
    edge: Callable[[torch.Tensor], GradientEdge]
    reference_counts: Callable[[torch.Tensor, list[torch.Tensor]], list[int]] | None


def clipping_internals() -> ClippingInternals:
    """torch's internals on the verified torch, the public equivalents on any other (one warning)."""
    if torch_verified():
        return ClippingInternals(grads_to=_engine_grads_to, edge=_fast_edge, reference_counts=_reference_counts)
    return ClippingInternals(grads_to=_public_grads_to, edge=get_gradient_edge, reference_counts=None)


_AUTOGRAD_ENGINE = torch.autograd.Variable._execution_engine  # the engine torch.autograd.grad runs


def _engine_grads_to(loss: torch.Tensor, outputs: tuple[GradientEdge, ...]) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, outputs, allow_unused=True)`` for a scalar loss, called on
    autograd's engine directly: the wrapper's argument handling costs ~50 us a call on a CPU,
    a tenth of a small tabular model's whole step."""
    return _AUTOGRAD_ENGINE.run_backward((loss,), (torch.ones_like(loss),), False, False, outputs, True, False)


def _public_grads_to(loss: torch.Tensor, outputs: tuple[GradientEdge, ...]) -> tuple[torch.Tensor | None, ...]:
    """The same backward pass through torch's public API."""
    return torch.autograd.grad(loss, outputs, allow_unused=True)


def _fast_edge(output: torch.Tensor) -> GradientEdge:
    """``get_gradient_edge(output)`` for a layer's output, built directly where autograd's own
    node keeps the graph alive (what ``get_gradient_edge`` checks costs a small layer's time)."""
    node = output.grad_fn
    if node is None or isinstance(node, torch._C._FunctionBase):
        return get_gradient_edge(output)
    return GradientEdge(node, output.output_nr)


def _reference_counts(flat: torch.Tensor, views: list[torch.Tensor]) -> list[int]:
    return [sys.getrefcount(flat), *(sys.getrefcount(v) for v in views)]
