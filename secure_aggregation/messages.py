"""Secure aggregation's messages: each exchange's request and reply, encoded and decoded here only.

Every payload rides flattened under ``protocol.SECAGG`` ("secagg/...") in a message's config record
(server -> node) or a reply's hospital record (node -> server), exactly as before: the record keys
do not change, only who reads them. The coordinator's round code (``server/secure_rounds.py``) and
the hospital's (``client/secure_update.py``, ``client/client_app.py``) build and take these
dataclasses and never index a payload by string.

Decoding checks each top-level field's presence and type and raises ``SecAggError`` naming the
message and the field. What a field carries inside (advertisements, sealed shares, signed
statements) is the protocol's own data: the node and server halves verify it (signatures,
commitments, lengths) where they use it, so it is passed on as a mapping.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedcare import protocol
from fedcare.errors import FedcareError
from fedcare.wire import read
from secure_aggregation.errors import SecAggError
from secure_aggregation.records import flatten, pack_vector, unflatten, unpack_vector

PATHS = ("fast", "consistency")  # how a round is unmasked: nobody dropped, or someone did
_M = TypeVar("_M", bound="_Message")


def payload(record: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The nested secure-aggregation payload in a record's ``secagg/`` keys; refused when absent."""
    if not any(key.startswith(protocol.SECAGG) for key in record):
        raise SecAggError(f"the {what} carries no secure-aggregation payload")
    return unflatten(record, protocol.SECAGG)


def _field(values: Mapping[str, Any], key: str, kind: str, what: str, default: Any = ...) -> Any:
    """A payload field: scalars and lists through ``fedcare.wire.read``; ``mapping`` and ``bytes`` here."""
    if kind in ("mapping", "bytes"):
        if key not in values:
            if default is ...:
                raise SecAggError(f"the {what}'s {key} is missing")
            return default
        value = values[key]
        ok = isinstance(value, Mapping) if kind == "mapping" else isinstance(value, (bytes, bytearray))
        if not ok:
            raise SecAggError(f"the {what}'s {key} is not {'a table' if kind == 'mapping' else 'bytes'}")
        return dict(value) if kind == "mapping" else bytes(value)
    try:
        return read(values, key, kind, what) if default is ... else read(values, key, kind, what, default)
    except FedcareError as exc:
        raise SecAggError(exc.problem, exc.hint) from None


class _Message:
    """Encoding shared by every message: its fields, flattened under ``secagg/``."""

    WHAT: ClassVar[str]
    KINDS: ClassVar[dict[str, str]]  # field -> kind ("int", "ints", "str", "mapping", "bytes")
    DEFAULTS: ClassVar[dict[str, Any]] = {}  # fields that may be absent, and what they then are

    def to_config(self) -> dict[str, Any]:
        """The record entries (``secagg/...`` keys) that carry this message."""
        return flatten(self._values(), protocol.SECAGG)

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.KINDS}

    @classmethod
    def from_config(cls: type[_M], record: Mapping[str, Any]) -> _M:
        """Decode from a config or hospital record; a missing or mistyped field is named."""
        return cls.from_payload(payload(record, cls.WHAT))

    @classmethod
    def from_payload(cls: type[_M], values: Mapping[str, Any]) -> _M:
        fields = {
            name: _field(values, name, kind, cls.WHAT, copy.copy(cls.DEFAULTS.get(name, ...)))
            for name, kind in cls.KINDS.items()
        }
        return cls(**fields)


# ---- setup 1: key advertisement (protocol.SECAGG_ADVERTISE) ---------------------------------------
@dataclasses.dataclass(frozen=True)
class KeyAgreementRequest(_Message):
    """Who the federation is and the threshold the coordinator asks for; the hospital checks both
    against its own policy before it advertises its keys."""

    threshold: int
    neighbours: int
    nodes: list[int]

    WHAT: ClassVar[str] = "key-agreement request"
    KINDS: ClassVar[dict[str, str]] = {"threshold": "int", "neighbours": "int", "nodes": "ints"}


@dataclasses.dataclass(frozen=True)
class AdvertiseReply(_Message):
    """The hospital's signed advertisement of its public keys (verified by the server half)."""

    advertisement: dict[Any, Any]

    WHAT: ClassVar[str] = "key advertisement"
    KINDS: ClassVar[dict[str, str]] = {"advertisement": "mapping"}


# ---- setup 2: key sharing (protocol.SECAGG_SHARE_KEYS) --------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShareKeysRequest(_Message):
    """Every member's advertisement, by node id: the hospital verifies them and deals its first mask key."""

    ads: dict[Any, Any]

    WHAT: ClassVar[str] = "key-sharing request"
    KINDS: ClassVar[dict[str, str]] = {"ads": "mapping"}


@dataclasses.dataclass(frozen=True)
class ShareKeysReply(_Message):
    """Sealed shares of the hospital's first mask key and its signed setup statement."""

    setup: dict[Any, Any]

    WHAT: ClassVar[str] = "key-sharing reply"
    KINDS: ClassVar[dict[str, str]] = {"setup": "mapping"}


# ---- every round: the mask request rides in the train message, the masked update in its reply -----
@dataclasses.dataclass(frozen=True)
class MaskRequest(_Message):
    """Round ``round``'s mask keys of the hospital's neighbours (public key, signed statement and its
    sealed share of each one's private key)."""

    round: int
    peers: dict[Any, Any]

    WHAT: ClassVar[str] = "mask request"
    KINDS: ClassVar[dict[str, str]] = {"round": "int", "peers": "mapping"}


@dataclasses.dataclass(frozen=True)
class MaskedUpdate:
    """The masked, quantised update (uint64, packed as bytes on the wire) and the signed round
    statement that comes with it (the nodes it masked with, commitments, sealed shares)."""

    masked: np.ndarray
    statement: dict[Any, Any]

    WHAT: ClassVar[str] = "masked update"

    def to_config(self) -> dict[str, Any]:
        return flatten({"masked": pack_vector(self.masked), "statement": self.statement}, protocol.SECAGG)

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> MaskedUpdate:
        values = payload(record, cls.WHAT)
        if "masked" not in values:
            raise SecAggError(f"the {cls.WHAT}'s masked vector is missing")
        return cls(
            unpack_vector(values["masked"], f"the {cls.WHAT}"),
            _field(values, "statement", "mapping", cls.WHAT),
        )

    @property
    def active(self) -> list[int]:
        """The nodes it says it masked with."""
        return [int(v) for v in self.statement.get("active", [])]


# ---- a round with dropouts: one signed view of the survivors (protocol.SECAGG_VIEW) ---------------
@dataclasses.dataclass(frozen=True)
class ViewRequest(_Message):
    round: int
    survivors: list[int]

    WHAT: ClassVar[str] = "view request"
    KINDS: ClassVar[dict[str, str]] = {"round": "int", "survivors": "ints"}


@dataclasses.dataclass(frozen=True)
class ViewReply(_Message):
    sig: bytes

    WHAT: ClassVar[str] = "view signature"
    KINDS: ClassVar[dict[str, str]] = {"sig": "bytes"}


# ---- unmask (protocol.SECAGG_UNMASK) ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UnmaskRequest(_Message):
    """What the hospital is asked to reveal: on the fast path (nobody dropped) self-mask shares only;
    on the consistency path, what the signed view of the survivors calls for."""

    round: int
    path: str
    b_share_ciphertexts: dict[Any, Any]
    statements: dict[Any, Any]
    survivors: list[int] = dataclasses.field(default_factory=list)
    signatures: dict[Any, Any] = dataclasses.field(default_factory=dict)

    WHAT: ClassVar[str] = "unmask request"
    KINDS: ClassVar[dict[str, str]] = {
        "round": "int",
        "path": "str",
        "b_share_ciphertexts": "mapping",
        "statements": "mapping",
        "survivors": "ints",
        "signatures": "mapping",
    }
    DEFAULTS: ClassVar[dict[str, Any]] = {"b_share_ciphertexts": {}, "statements": {}, "signatures": {}}

    @classmethod
    def from_payload(cls, values: Mapping[str, Any]) -> UnmaskRequest:
        path = _field(values, "path", "str", cls.WHAT)
        if path not in PATHS:
            raise SecAggError(f"the {cls.WHAT}'s path is not one of {', '.join(PATHS)}")
        survivors = _field(values, "survivors", "ints", cls.WHAT, [] if path == "fast" else ...)
        return cls(
            round=_field(values, "round", "int", cls.WHAT),
            path=path,
            b_share_ciphertexts=_field(values, "b_share_ciphertexts", "mapping", cls.WHAT, {}),
            statements=_field(values, "statements", "mapping", cls.WHAT, {}),
            survivors=survivors,
            signatures=_field(values, "signatures", "mapping", cls.WHAT, {}),
        )


@dataclasses.dataclass(frozen=True)
class UnmaskReply(_Message):
    """What the hospital revealed: self-mask shares ``b`` and, for dropped neighbours, mask-key shares
    ``s``; ``complaints``: the owners whose sealed shares failed authentication at this hospital."""

    b: dict[Any, Any]
    s: dict[Any, Any]
    complaints: list[int] = dataclasses.field(default_factory=list)

    WHAT: ClassVar[str] = "unmask reply"
    KINDS: ClassVar[dict[str, str]] = {"b": "mapping", "s": "mapping", "complaints": "ints"}
    DEFAULTS: ClassVar[dict[str, Any]] = {"b": {}, "s": {}, "complaints": []}

    def revealed(self) -> dict[str, Any]:
        """The reveal as the server half's ``finish`` takes it."""
        return {"b": self.b, "s": self.s}

    @property
    def survivors(self) -> list[int]:
        """The nodes whose self-mask shares it revealed (they survived, in its view)."""
        return sorted(int(v) for v in self.b)

    @property
    def dropped(self) -> list[int]:
        """The nodes whose mask-key shares it revealed (dropped, in its view)."""
        return sorted(int(v) for v in self.s)


@dataclasses.dataclass(frozen=True)
class EndRequest(_Message):
    """The run is over: the hospital deletes this run's private key material."""

    end: bool = True

    WHAT: ClassVar[str] = "end-of-run request"
    KINDS: ClassVar[dict[str, str]] = {"end": "bool"}
