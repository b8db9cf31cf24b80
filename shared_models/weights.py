"""Model weights <-> Flower ArrayRecord, keyed by parameter name (never by position).

Names come from ``named_parameters()`` of the plain module, so Opacus wrappers (``_module.``
prefixes) and layers whose ``state_dict`` carries alias keys (DPGRU/DPLSTM) exchange cleanly.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import nn

_WRAPPER_PREFIX = "_module."


def _plain(model: nn.Module) -> nn.Module:
    return getattr(model, "_module", model)


def parameter_names(model: nn.Module) -> list[str]:
    return [name for name, _ in _plain(model).named_parameters()]


def parameter_values(model: nn.Module) -> dict[str, np.ndarray]:
    """Trainable parameters as numpy arrays keyed by parameter name: views of a CPU model's own
    storage (read them before the model changes), no copy of a large model."""
    return {name: p.detach().cpu().numpy() for name, p in _plain(model).named_parameters()}


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """Trainable parameters as an ArrayRecord keyed by parameter name."""
    return ArrayRecord({name: Array(value.copy()) for name, value in parameter_values(model).items()})


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in arrays.items()}


def pack_arrays(arrays: ArrayRecord) -> ConfigRecord:
    """The model as one ConfigRecord of ``.npy`` bytes keyed by parameter name, for the wire.

    Flower stores and moves every record, array and array chunk as an object of its own: one
    request each at the SuperLink and at every node that pulls the message. A ConfigRecord is one
    object however many parameters the model has; a model shared by all nodes of an exchange stays
    one stored object, since objects are addressed by their content.
    """
    packed: dict[str, Any] = {}
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array.numpy(), allow_pickle=False)
        packed[name] = buffer.getvalue()
    return ConfigRecord(packed)


def unpack_arrays(record: ConfigRecord) -> ArrayRecord:
    """Inverse of ``pack_arrays``; an entry that is not a packed array is an error naming it."""
    arrays = {}
    for name, value in record.items():
        try:
            if not isinstance(value, bytes):
                raise ValueError(f"a {type(value).__name__}, not bytes")
            arrays[name] = Array(np.load(io.BytesIO(value), allow_pickle=False))
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"model weight '{name}' in the message is not a packed array ({exc})") from None
    return ArrayRecord(arrays)


def load_arrays(model: nn.Module, arrays: ArrayRecord | dict[str, np.ndarray]) -> None:
    """Copy weights into ``model`` by name; a missing, extra or misshaped name is an error."""
    values = arrays_to_numpy(arrays) if isinstance(arrays, ArrayRecord) else arrays
    params = dict(_plain(model).named_parameters())
    missing = sorted(set(params) - set(values))
    extra = sorted(set(values) - set(params))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.as_tensor(values[name], dtype=param.dtype)
            if value.shape != param.shape:
                raise ValueError(f"weight '{name}' has shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
            param.copy_(value)


def weights_digest(arrays: ArrayRecord | dict[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes, in name order: identifies a model version."""
    values = arrays_to_numpy(arrays) if isinstance(arrays, ArrayRecord) else arrays
    h = hashlib.sha256()
    for name in sorted(values):
        a = np.ascontiguousarray(values[name])
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()
