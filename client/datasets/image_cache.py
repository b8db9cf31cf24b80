"""Decode each DICOM file once: preprocessed arrays on local disk, keyed by content and policy.

Decoding (JPEG 2000 in particular) costs far more than hashing, and a hospital trains for many
rounds and runs. An entry's key is SHA-256 of the file bytes + `ImagePolicy.key()` (which holds
the preprocessing version) + this cache's format version, so a changed file, size, policy or
algorithm never reads a stale entry. Each entry carries a SHA-256 of its payload: a truncated or
flipped entry is a miss (and is rewritten by the next `put`), never a crash. Writes go to a
temporary file in the same directory, then a rename (`fedcare.atomic_files`): readers see a whole
entry or none.

Rejections are not cached: most are header checks that cost less than the hash, and a file
whose pixels fail to decode must be fixed by the user anyway.
The cache holds derived pixels of local patients: it stays on the hospital's disk, like the data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from client.datasets.dicom_reader import ImagePolicy
from fedcare.atomic_files import replace_file

CACHE_FORMAT_VERSION = 1
_MAGIC = b"FEDCARE-IMAGE-CACHE\n"


def file_digest(data: bytes) -> str:
    """SHA-256 hex digest of a file's bytes: the content half of a cache key."""
    return hashlib.sha256(data).hexdigest()


class ImageCache:
    """A directory of preprocessed images; `hits` and `misses` count lookups."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path_for(self, digest: str, policy: ImagePolicy) -> Path:
        key = hashlib.sha256(f"{digest}|{policy.key()}|cache-v{CACHE_FORMAT_VERSION}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.img"

    def get(self, digest: str, policy: ImagePolicy) -> list[np.ndarray] | None:
        """The arrays stored for this file and policy, or None (absent or corrupt)."""
        arrays = self._load(self.path_for(digest, policy), policy)
        if arrays is None:
            self.misses += 1
        else:
            self.hits += 1
        return arrays

    def put(self, digest: str, policy: ImagePolicy, arrays: list[np.ndarray]) -> None:
        """Store `arrays` (each size x size float32) atomically, replacing any old entry."""
        stack = np.ascontiguousarray(np.stack(arrays), dtype=np.float32)
        if stack.ndim != 3 or stack.shape[1:] != (policy.size, policy.size):
            raise ValueError(f"expected arrays of shape ({policy.size}, {policy.size}), got {stack.shape[1:]}")
        payload = stack.tobytes()
        header = json.dumps(
            {"shape": list(stack.shape), "dtype": "<f4", "sha256": hashlib.sha256(payload).hexdigest()}
        ).encode()
        target = self.path_for(digest, policy)
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_file(target, _MAGIC + header + b"\n" + payload)  # 0600: derived pixels of local patients

    @staticmethod
    def _load(path: Path, policy: ImagePolicy) -> list[np.ndarray] | None:
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        try:
            if not blob.startswith(_MAGIC):
                return None
            header_end = blob.index(b"\n", len(_MAGIC))
            header = json.loads(blob[len(_MAGIC) : header_end])
            payload = blob[header_end + 1 :]
            shape = tuple(int(n) for n in header["shape"])
            if (
                header.get("dtype") != "<f4"
                or len(shape) != 3
                or shape[0] < 1
                or shape[1:] != (policy.size, policy.size)
                or len(payload) != 4 * shape[0] * shape[1] * shape[2]
                or hashlib.sha256(payload).hexdigest() != header.get("sha256")
            ):
                return None
            stack = np.frombuffer(payload, dtype="<f4").reshape(shape).astype(np.float32)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return None
        return list(stack)


class HeaderIndex:
    """What pass 1 learned about each file (digest, identifying-attribute keywords, size), keyed by
    the file's size and modification time, so a later epoch or round need not reread unchanged files.

    One JSON per (folder, PHI-retain options) under the cache root; a stale or corrupt index is
    simply rebuilt. Like make, it trusts (size, mtime_ns): a file rewritten with the same size
    within the same nanosecond would be missed; any real edit changes the mtime.
    """

    def __init__(self, root: Path, folder: Path, retain: tuple[str, ...]) -> None:
        key = hashlib.sha256(f"{Path(folder).resolve()}|{','.join(retain)}|v{CACHE_FORMAT_VERSION}".encode())
        self.path = Path(root) / "headers" / f"{key.hexdigest()}.json"
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def get(self, folder: Path, name: str) -> dict | None:
        entry = self.entries.get(name)
        try:
            return entry if entry is not None and entry.get("stamp") == self._stamp(folder / name) else None
        except OSError:
            return None

    def put(self, folder: Path, name: str, digest: str, phi: list[str], size: tuple[int, int]) -> None:
        try:
            stamp = self._stamp(folder / name)
        except OSError:
            return
        self.entries[name] = {"stamp": stamp, "digest": digest, "phi": list(phi), "size": list(size)}
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, json.dumps(self.entries))
