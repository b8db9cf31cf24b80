"""Replacing a hospital's private file (keys, approvals, protocol state) so a crash leaves the old
file or the new one, never a torn one, and the new one is never readable by anyone else."""

from __future__ import annotations

import os
from pathlib import Path


def replace_private(path: Path, data: bytes, sync_folder: bool = False) -> None:
    """Atomically replace ``path`` with ``data``: a 0600 temporary file beside it, fsynced, then
    renamed over it. ``sync_folder`` also fsyncs the folder, so the rename itself survives a crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)   # a leftover could carry a looser mode; O_EXCL creates it 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
