"""A cross-process lock on a folder that generated hospital data is written into."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked_folder(root: Path) -> Iterator[None]:
    """Serialise writers of the same root (parallel simulation workers may all ask for it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, callers must not race
        yield
        return
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
