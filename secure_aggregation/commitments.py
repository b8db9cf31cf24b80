"""A dealer's share commitments as one packed record: what its signed statement commits to.

A dealer commits to the hash of every share it deals (``node_half.share_hash``), one per holder.
They travel and are signed as one byte string, holder ids ascending, each record a 16-byte
big-endian holder id followed by the 32-byte hash:

- a holder checking a neighbour's statement hashes that string once (one C call, not a Python loop
  over k holders) and finds its own commitment by binary search, so checking its k neighbours'
  statements costs O(k log k) a round instead of O(k^2);
- the server unpacks it once per statement, checking that it covers exactly the holders the dealer
  dealt to;
- on the wire it is one value, not k record keys.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping

from secure_aggregation.errors import SecAggError

ID_BYTES = 16
HASH_BYTES = 32
RECORD_BYTES = ID_BYTES + HASH_BYTES
_DOMAIN = b"fedcare-secagg/v2/commitments"


def pack(commits: Mapping[int, bytes]) -> bytes:
    """{holder: share hash} -> the packed string, holders ascending."""
    return b"".join(int(h).to_bytes(ID_BYTES, "big") + bytes(c) for h, c in sorted(commits.items()))


def checked(blob: object, what: str) -> bytes:
    """``blob`` as bytes of whole records (anything else: ``SecAggError`` naming ``what``)."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) % RECORD_BYTES:
        raise SecAggError(f"{what} are not packed share commitments")
    return bytes(blob)


def digest(blob: bytes) -> bytes:
    """What a statement signs of the commitments (the packed string, as it is)."""
    return hashlib.sha256(_DOMAIN + blob).digest()


def lookup(blob: bytes, holder: int) -> bytes | None:
    """The commitment to ``holder``'s share, or None (a string that is not in order finds nothing:
    the dealer signed it, so that is the dealer's fault, never the holder's)."""
    count = len(blob) // RECORD_BYTES
    i = bisect.bisect_left(
        range(count), holder, key=lambda j: int.from_bytes(blob[j * RECORD_BYTES : j * RECORD_BYTES + ID_BYTES], "big")
    )
    if i < count and int.from_bytes(blob[i * RECORD_BYTES : i * RECORD_BYTES + ID_BYTES], "big") == holder:
        return blob[i * RECORD_BYTES + ID_BYTES : (i + 1) * RECORD_BYTES]
    return None


def unpack(blob: object, holders: list[int], what: str) -> dict[int, bytes]:
    """{holder: hash} from a packed string that covers exactly ``holders`` (sorted), ids ascending."""
    data = checked(blob, what)
    out = {
        int.from_bytes(data[i : i + ID_BYTES], "big"): data[i + ID_BYTES : i + RECORD_BYTES]
        for i in range(0, len(data), RECORD_BYTES)
    }
    if list(out) != holders:
        raise SecAggError(f"{what} do not cover the nodes it dealt to, in order")
    return out
