"""Flatten protocol payloads into one-level dicts for transports such as Flower ConfigRecords.

Why: the protocol's messages nest dicts keyed by node id ({"b_shares": {7: b"..."}}), while a
ConfigRecord holds only str keys with scalars or lists of scalars. ``flatten`` joins the key
path with "/" ("b_shares/7" -> bytes), marks an empty dict with a trailing "/" key, and
``unflatten`` rebuilds the nesting (node-id keys come back as decimal strings, which both
protocol halves accept). Arrays are refused: send the masked vector in an ArrayRecord.
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
            raise SecAggError(f"payload field {path!r} is an array; send it in an ArrayRecord instead")
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
