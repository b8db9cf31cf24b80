"""Secure aggregation's typed messages: what one side encodes the other decodes, and a malformed
payload is refused naming the message and the field (never a KeyError deep in the protocol)."""

from __future__ import annotations

import numpy as np
import pytest

from fedcare import protocol
from secure_aggregation import SecAggError
from secure_aggregation.messages import (
    AdvertiseReply,
    EndRequest,
    KeyAgreementRequest,
    MaskedUpdate,
    MaskRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
    ViewReply,
    ViewRequest,
)

MESSAGES = [
    KeyAgreementRequest(3, 2, [11, 12, 13]),
    AdvertiseReply({"name": "Hungary", "identity": b"\x01" * 32, "t": 3, "k": 2}),
    ShareKeysRequest({"11": {"name": "A", "c_pk": b"a"}, "12": {"name": "B", "c_pk": b"b"}}),
    ShareKeysReply({"shares": {"12": b"ct"}, "participants": b"p", "sig": b"s"}),
    MaskRequest(4, {"12": {"s_pk": b"k", "ct": b"c", "active": [11, 12]}}),
    ViewRequest(4, [11, 12]),
    ViewReply(b"\x02" * 64),
    UnmaskRequest(4, "fast", {"12": b"ct"}, {"12": {"sig": b"s"}}),
    UnmaskRequest(4, "consistency", {"12": b"ct"}, {"12": {"sig": b"s"}}, [11, 12], {"11": b"sig"}),
    UnmaskReply({"12": b"share"}, {"13": b"share"}, [13]),
    EndRequest(),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_under_the_secagg_prefix(message):
    record = message.to_config()
    assert record and all(key.startswith(protocol.SECAGG) for key in record)
    assert type(message).from_config(record | {"num-rounds": 3}) == message  # other keys are ignored


def test_the_masked_update_travels_as_packed_bytes():
    update = MaskedUpdate(np.array([1, 2**64 - 1, 7], dtype=np.uint64), {"active": [11, 12], "sig": b"s"})
    record = update.to_config()
    assert isinstance(record[f"{protocol.SECAGG}masked"], bytes)
    back = MaskedUpdate.from_config(record)
    assert back.masked.tolist() == update.masked.tolist() and back.statement == update.statement
    assert back.active == [11, 12]


def test_an_unmask_reply_says_whom_it_revealed_for():
    reply = UnmaskReply({"12": b"x", "11": b"y"}, {"13": b"z"})
    assert (reply.survivors, reply.dropped) == ([11, 12], [13])
    assert UnmaskReply.from_config({f"{protocol.SECAGG}b/11": b"y"}) == UnmaskReply({"11": b"y"}, {})


@pytest.mark.parametrize(
    ("kind", "record", "message"),
    [
        (AdvertiseReply, {"name": "H"}, "key advertisement carries no secure-aggregation payload"),
        (
            KeyAgreementRequest,
            {"secagg/threshold": 2, "secagg/neighbours": 1},
            "key-agreement request's nodes is missing",
        ),
        (ViewReply, {"secagg/sig": "not bytes"}, "view signature's sig is not bytes"),
        (ShareKeysRequest, {"secagg/ads": 5}, "key-sharing request's ads is not a table"),
        (
            UnmaskRequest,
            {"secagg/round": 1, "secagg/path": "slow"},
            "unmask request's path is not one of fast, consistency",
        ),
        (UnmaskRequest, {"secagg/round": 1, "secagg/path": "consistency"}, "unmask request's survivors is missing"),
        (MaskedUpdate, {"secagg/statement/active": [1]}, "masked update's masked vector is missing"),
        (MaskedUpdate, {"secagg/masked": b"\x00" * 7, "secagg/statement/sig": b""}, "not a packed uint64 vector"),
    ],
)
def test_a_malformed_payload_is_named(kind, record, message):
    with pytest.raises(SecAggError, match=message):
        kind.from_config(record)
