"""Run-config values read as their declared types, one way for the coordinator's settings
(``fedcare.run_config``) and for the run request a hospital decodes (``fedcare.protocol``)."""

from __future__ import annotations

from typing import Any


def typed(value: Any, kind: str) -> Any:
    """``value`` as ``kind`` ("bool", "int", "float" or anything else for text). Raises ValueError
    when it is not one, never guesses: text booleans are true/false/1/0 (not Python's "any
    non-empty string"), and an int must be whole."""
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.strip().lower() in ("true", "1")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, OverflowError) as exc:
        raise ValueError(value) from exc
