"""Durable JSON state for one node's secure-aggregation run (atomic, owner-only file).

Why a file: a Flower ClientApp process may be fresh for every message, so everything a node
must remember between protocol steps (its private keys, the shares it holds, what it has
revealed) lives on disk in the hospital's private state directory. Writes go to a temporary
file in the same directory, are fsynced, then ``os.replace``d over the old file, so a crash
leaves either the old or the new state, never a torn one. The file is created with mode 0600.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from fedcare.atomic_files import replace_file
from secure_aggregation.errors import SecAggError

FORMAT = "fedcare-secagg-node/1"


def b64(data: bytes) -> str:
    """Bytes as base64 text for the JSON file."""
    return base64.b64encode(bytes(data)).decode("ascii")


def unb64(text: str) -> bytes:
    """Base64 text from the JSON file back to bytes."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def load(path: Path) -> dict[str, Any] | None:
    """Read the state at ``path``; None if there is none yet."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SecAggError(
            f"secure-aggregation state {path} cannot be read ({exc})",
            "the node cannot continue this run; remove the file and join a new run",
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SecAggError(f"{path} is not a fedcare secure-aggregation node state ({FORMAT})")
    return state


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace the state at ``path`` (tmp file + fsync + os.replace, mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # compact: the C encoder (an indented dump takes Python's, several times slower on every message)
    data = json.dumps({**state, "format": FORMAT}, sort_keys=True, separators=(",", ":")).encode("utf-8")
    replace_file(path, data)
