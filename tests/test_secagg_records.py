"""Protocol messages survive a trip through Flower ConfigRecord serialisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from secure_aggregation import Quantizer, SecAggError, SecAggNode, SecAggServer
from secure_aggregation.identity import SimulatedConsortium
from secure_aggregation.records import flatten, pack_vector, unflatten, unpack_vector
from tests.support import secagg_inprocess as ip

IDS = [3, 2**63 + 5, 2**64 - 1]  # Flower node ids are uint64


def _wire(payload: dict[str, Any]) -> dict[str, Any]:
    """Send a payload as a ConfigRecord (serialised to protobuf and back)."""
    record = ConfigRecord(flatten(payload))
    return unflatten(config_record_from_proto(config_record_to_proto(record)))


def _wire_masked(reply: dict[str, Any]) -> dict[str, Any]:
    """A mask reply as the hospital sends it: the masked vector packed among the ConfigRecord's keys."""
    sent = _wire({**reply, "masked": pack_vector(reply["masked"])})
    return {**sent, "masked": unpack_vector(sent["masked"], "the masked update")}


def test_flatten_round_trip_and_refusals() -> None:
    payload = {"round": 2, "survivors": [1, 2], "b": {7: b"x", 9: b"y"}, "s": {}, "tag": "t"}
    assert flatten(payload)["b/7"] == b"x"
    back = unflatten(flatten(payload))
    assert back == {"round": 2, "survivors": [1, 2], "b": {"7": b"x", "9": b"y"}, "s": {}, "tag": "t"}
    with pytest.raises(SecAggError, match="pack it with pack_vector"):
        flatten({"masked": np.zeros(2, dtype=np.uint64)})
    with pytest.raises(SecAggError, match="cannot be flattened"):
        flatten({"a/b": 1})


def test_masked_vector_packs_to_bytes_and_back_exactly() -> None:
    vector = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)
    data = pack_vector(vector)
    assert len(data) == 32
    back = unpack_vector(data, "x")
    assert back.dtype == np.uint64 and np.array_equal(back, vector)
    with pytest.raises(SecAggError, match="only a 1-D uint64 vector"):
        pack_vector(vector.astype(np.int64))
    with pytest.raises(SecAggError, match="the masked update of node 7 is not a packed uint64 vector"):
        unpack_vector(data[:-3], "the masked update of node 7")
    with pytest.raises(SecAggError, match="not a packed uint64 vector"):
        unpack_vector(None, "the masked update")


def test_full_protocol_over_flower_records(tmp_path: Path) -> None:
    """Every message of a round with a dropout (the consistency path) through flatten/unflatten and back."""
    run, t, length = 77, 2, 9
    q = Quantizer(1.0)
    rng = np.random.default_rng(8)
    deltas = {i: rng.uniform(-1, 1, length - 1) for i in IDS}
    consortium = SimulatedConsortium(b"\x09" * 32)
    server = SecAggServer(run, t, len(IDS) - 1, IDS, length)

    def node(i: int) -> SecAggNode:
        return SecAggNode(ip.state_path(tmp_path, run, i), consortium)

    for i in IDS:
        server.add_advertisement(i, _wire(node(i).advertise(run, i, ip.name_of(i), t, len(IDS) - 1, IDS)))
    ads = _wire({"ads": server.advertisements()})["ads"]
    for i in IDS:
        server.add_setup(i, _wire(node(i).share_keys(ads)))
    for i, req in server.start_round(1).items():
        req = _wire(req)
        node(i).receive_keys(req["round"], req["peers"])
        if i == IDS[1]:
            continue  # dropped this round
        server.add_masked(i, _wire_masked(node(i).mask(1, q.encode(deltas[i], 1))))
    assert not server.fast_path()
    for i, req in server.view_requests().items():
        req = _wire(req)
        server.add_view_signature(i, _wire({"sig": node(i).sign_view(req["round"], req["survivors"])})["sig"])
    replies = {}
    for i, req in server.unmask_requests().items():
        req = _wire(req)
        replies[i] = _wire(
            node(i).unmask(
                req["round"], req["survivors"], req["signatures"], req["b_share_ciphertexts"], req["statements"]
            )
        )
    total, outcome = server.finish(replies)
    mean, weight = q.decode_mean(total, len(outcome.survivors))
    assert weight == 2
    assert np.max(np.abs(mean - (deltas[IDS[0]] + deltas[IDS[2]]) / 2)) <= q.error_bound + 1e-12
