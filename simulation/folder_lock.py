"""A folder that generated hospital data is written into: a cross-process lock on it, and the rule that
a generator replaces only the hospital folders it wrote itself (each carries the generator's marker file)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedcare.errors import FedcareError


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


def remove_previous(root: Path, marker: str, generator: str) -> None:
    """Delete the hospital-* folders under ``root`` that carry ``marker`` (a previous call of the
    ``generator`` wrote them); refuse, touching nothing, when any does not."""
    folders = sorted(root.glob("hospital-*"))
    for folder in folders:
        if not (folder / marker).is_file():
            raise FedcareError(
                f"{folder} exists and was not written by the {generator} generator",
                f"point the {generator} data set at an empty or dedicated folder",
            )
    for folder in folders:
        shutil.rmtree(folder)


def publish_staged(root: Path, staging: Path, names: list[str], marker: str, generator: str) -> None:
    """Replace the generator's previous hospital folders under ``root`` with the ones written in
    ``staging`` (``names``); a folder the generator did not write is refused, and nothing moves."""
    remove_previous(root, marker, generator)
    for name in names:
        (staging / name).rename(root / name)
