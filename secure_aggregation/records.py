"""Flatten protocol payloads into one-level dicts for transports such as Flower ConfigRecords.

Why: the protocol's messages nest dicts keyed by node id ({"b_shares": {7: b"..."}}), while a
ConfigRecord holds only str keys with scalars or lists of scalars. ``flatten`` joins the key
path with "/" ("b_shares/7" -> bytes), marks an empty dict with a trailing "/" key, and
``unflatten`` rebuilds the nesting (node-id keys come back as decimal strings, which both
protocol halves accept). Arrays are refused: the masked vector goes as bytes (``pack_vector``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from secure_aggregation.errors import SecAggError

SEP = "/"


def flatten(payload: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """One-level dict of scalars/lists from a nested payload (keys joined with "/")."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        name = str(key)
        if not name or SEP in name:
            raise SecAggError(f"payload key {name!r} cannot be flattened (empty or contains {SEP!r})")
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(value, path + SEP))
            else:
                out[path + SEP] = ""
        elif isinstance(value, np.ndarray):
            raise SecAggError(f"payload field {path!r} is an array; pack it with pack_vector")
        elif isinstance(value, (list, tuple)):
            out[path] = [int(v) if isinstance(v, np.integer) else v for v in value]
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of ``flatten`` for the keys under ``prefix`` (other keys are ignored)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].split(SEP)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if parts[-1]:
            node[parts[-1]] = list(value) if isinstance(value, list) else value
    return out


_WIRE_DTYPE = np.dtype("<u8")  # the masked vector's elements: uint64, little-endian on the wire


def pack_vector(vector: np.ndarray) -> bytes:
    """A masked uint64 vector as bytes for a ConfigRecord (one object on the wire, not an
    ArrayRecord's three)."""
    if vector.dtype != np.uint64 or vector.ndim != 1:
        raise SecAggError(f"only a 1-D uint64 vector is packed, got {vector.dtype} {vector.shape}")
    return vector.astype(_WIRE_DTYPE, copy=False).tobytes()


def unpack_vector(data: Any, what: str) -> np.ndarray:
    """``pack_vector``'s inverse, a read-only view of ``data`` (no copy of a large update); a payload
    that is not whole uint64 values is named and refused."""
    if not isinstance(data, bytes) or len(data) % _WIRE_DTYPE.itemsize:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise SecAggError(f"{what} is not a packed uint64 vector (got {size} bytes)")
    return np.frombuffer(data, dtype=_WIRE_DTYPE).astype(np.uint64, copy=False)
