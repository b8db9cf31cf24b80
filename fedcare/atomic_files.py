"""Replacing a file so a crash leaves the old file or the new one, never a torn one.

The one way fedcare rewrites a file in place (privacy ledgers, keys, approvals, protocol state,
cache entries, data-set manifests): a temporary file beside the target (same folder, so the rename
never crosses a file system), written, flushed and fsynced, then ``os.replace``d over the target.
A private file's temporary is created 0600 (``O_EXCL``: never briefly readable by anyone else).
Any failure before the rename removes the temporary and leaves the old file as it was. Locking,
where a caller needs it, stays with the caller.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE = 0o600  # keys, ledgers, approvals, protocol state, derived patient pixels
SHARED = 0o666  # what ``open()`` creates: the umask decides (generated, non-secret files)
TEMP_SUFFIX = ".tmp"


def replace_file(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int = PRIVATE, sync_folder: bool = False
) -> None:
    """Atomically replace ``path`` with ``data`` (``str`` is written as UTF-8).

    ``mode`` is the new file's permission bits, masked by the umask as ``open(2)`` masks them (the
    default, ``PRIVATE``, gives 0600 under any umask). ``sync_folder`` also fsyncs the folder, so
    the rename itself survives a power cut, not only the file's bytes.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
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
