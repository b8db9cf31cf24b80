"""The full protocol in-process: correct weighted means with dropouts at every stage, refusals,
tampering detection, state that survives reloads, and a server that keeps no individual input."""

from __future__ import annotations

import base64
import json
import os
import random
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_aggregation import (
    Quantizer,
    SecAggError,
    SecAggNode,
    SecAggServer,
    TamperingDetected,
    TooFewSurvivors,
    masking,
    shamir,
)
from secure_aggregation import inprocess as ip

CLIP = 0.5


def _ids(n: int) -> list[int]:
    rng = random.Random(n)  # Flower node ids are random uint64 values
    ids: set[int] = set()
    while len(ids) < n:
        ids.add(rng.getrandbits(64))
    return sorted(ids)


def _threshold(n: int) -> int:
    return n // 2 + 1


class Fed:
    """Inputs for a run: per node a float update in [-CLIP, CLIP] and a public integer weight."""

    def __init__(self, ids: list[int], length: int, seed: int) -> None:
        self.q = Quantizer(CLIP)
        rng = np.random.default_rng(seed)
        self.deltas = {i: rng.uniform(-CLIP, CLIP, length) for i in ids}
        self.weights = {i: int(rng.integers(1, 5000)) for i in ids}

    def encoded(self) -> dict[int, np.ndarray]:
        return {i: self.q.encode(d, self.weights[i]) for i, d in self.deltas.items()}

    def check(self, total: np.ndarray, survivors: Iterable[int]) -> None:
        surv = list(survivors)
        mean, weight = self.q.decode_mean(total, len(surv))
        true = sum(self.weights[i] * self.deltas[i] for i in surv) / sum(self.weights[i] for i in surv)
        assert weight == sum(self.weights[i] for i in surv)
        assert np.max(np.abs(mean - true)) <= self.q.error_bound + 1e-12


# ---- correctness with dropouts at every stage ----------------------------------------------------

STAGES = ["after_advertise", "after_share_keys", "before_mask", "after_mask"]
CASES = [("none", "zero")] + [(stage, k) for stage in STAGES for k in ("one", "n-t")]
GONE_BEFORE_ROUND = {"after_advertise", "after_share_keys", "before_mask"}


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize(("stage", "how_many"), CASES)
def test_secure_mean_equals_plain_weighted_mean(tmp_path: Path, n: int, stage: str, how_many: str) -> None:
    ids, t, length = _ids(n), _threshold(n), 40
    k = {"zero": 0, "one": 1, "n-t": n - t}[how_many]
    gone = set(ids[1 : 1 + k])  # never the first node: keep a mix of smaller/larger ids around
    fed = Fed(ids, length, seed=n)
    server = ip.setup(tmp_path, 42, t, ids, length + 1, after_advertise=gone if stage == "after_advertise" else ())
    silent = gone if stage in ("after_share_keys", "before_mask") else set()
    mute = gone if stage == "after_mask" else set()
    total = ip.run_round(server, tmp_path, 1, fed.encoded(), silent=silent, mute=mute)
    expected_survivors = sorted(set(ids) - gone) if stage in GONE_BEFORE_ROUND else ids
    assert server.survivors == expected_survivors
    fed.check(total, server.survivors)
    # A second round still works (rotated mask keys), without the dropped nodes.
    fed2 = Fed(ids, length, seed=n + 100)
    total2 = ip.run_round(server, tmp_path, 2, fed2.encoded())
    assert server.survivors == expected_survivors
    fed2.check(total2, server.survivors)


def test_setup_shares_can_be_delivered_on_their_own(tmp_path: Path) -> None:
    ids = [10, 20, 30]
    fed = Fed(ids, 6, seed=4)
    server = ip.setup(tmp_path, "setup-only", 2, ids, 7)
    requests = server.start_round(1)
    for nid, req in requests.items():
        _node(tmp_path, "setup-only", nid).receive_setup_shares(req["s_share_ciphertexts"])
        server.add_masked(nid, _node(tmp_path, "setup-only", nid).mask(1, fed.encoded()[nid]))
    fed.check(server.finish(ip.unmask_step(server, tmp_path, 1)), ids)


def test_ten_nodes_hundred_thousand_elements_with_dropout(tmp_path: Path) -> None:
    ids, t, length = _ids(10), 6, 100_000
    fed = Fed(ids, length, seed=3)
    server = ip.setup(tmp_path, "big", t, ids, length + 1)
    total = ip.run_round(server, tmp_path, 1, fed.encoded(), silent=[ids[4]], mute=[ids[7]])
    assert ids[4] in server.dropped and ids[7] in server.survivors
    fed.check(total, server.survivors)


def test_dropouts_accumulate_over_rounds_and_dropped_nodes_stay_out(tmp_path: Path) -> None:
    ids, t = _ids(7), 4
    fed = Fed(ids, 10, seed=9)
    server = ip.setup(tmp_path, "multi", t, ids, 11)
    fed.check(ip.run_round(server, tmp_path, 1, fed.encoded(), silent=[ids[0]]), server.survivors)
    assert server.dropped == [ids[0]]
    requests = ip.mask_step(server, tmp_path, 2, fed.encoded(), silent=[ids[5]])
    assert ids[0] not in requests  # a dropped node gets no further mask requests
    fed.check(server.finish(ip.unmask_step(server, tmp_path, 2, mute=[ids[1]])), server.survivors)
    assert server.dropped == [ids[0], ids[5]]
    # Round 3 with rounds numbers that skip (Flower may skip a round for secure aggregation).
    fed.check(ip.run_round(server, tmp_path, 5, fed.encoded()), server.survivors)
    assert server.survivors == sorted(set(ids) - {ids[0], ids[5]})


# ---- too few survivors: nothing revealed, nothing changed ---------------------------------------


def _node(tmp_path: Path, run: Any, nid: int) -> SecAggNode:
    return SecAggNode(ip.state_path(tmp_path, run, nid))


def test_below_threshold_survivors_raise_and_reveal_nothing(tmp_path: Path) -> None:
    ids, t = _ids(5), 3
    fed = Fed(ids, 8, seed=5)
    server = ip.setup(tmp_path, "few", t, ids, 9)
    ip.mask_step(server, tmp_path, 1, fed.encoded(), silent=ids[2:])
    with pytest.raises(TooFewSurvivors, match="only 2 of 5 nodes sent masked inputs for round 1; the threshold"):
        server.unmask_requests()
    for nid in ids:  # no node was asked to reveal anything
        state = json.loads(ip.state_path(tmp_path, "few", nid).read_text())
        assert state["revealed_s_for"] == []
        assert all(r["status"] == "masked" for r in state["rounds"].values())
    with pytest.raises(TooFewSurvivors):
        server.unmask_requests()  # state unchanged: still refuses, still open
    server.abort_round()
    with pytest.raises(TooFewSurvivors, match="only 2 nodes hold mask keys for round 2"):
        server.start_round(2)


def test_finish_with_too_few_replies_keeps_the_round_open(tmp_path: Path) -> None:
    ids, t = _ids(5), 3
    fed = Fed(ids, 8, seed=6)
    server = ip.setup(tmp_path, "open", t, ids, 9)
    ip.mask_step(server, tmp_path, 1, fed.encoded())
    replies = ip.unmask_step(server, tmp_path, 1, mute=ids[2:])
    with pytest.raises(TooFewSurvivors, match="only 2 of 5 survivors answered"):
        server.finish(replies)
    replies.update(ip.unmask_step(server, tmp_path, 1, mute=ids[:2] + ids[3:]))
    fed.check(server.finish(replies), ids)


def test_too_few_advertisers_or_threshold_not_a_majority() -> None:
    server = SecAggServer(1, 3, [1, 2, 3, 4], 4)
    with pytest.raises(TooFewSurvivors, match="only 0 of 4 nodes advertised"):
        server.public_keys()
    with pytest.raises(SecAggError, match="majority threshold between 3 and 4"):
        SecAggServer(1, 2, [1, 2, 3, 4], 4)
    with pytest.raises(SecAggError, match="at least 2 nodes"):
        SecAggServer(1, 1, [1], 4)


# ---- the late input of a dropped node stays protected ---------------------------------------------


def test_late_input_of_a_dropped_node_stays_masked(tmp_path: Path) -> None:
    ids, t, length = [1, 2, 3, 4, 5], 3, 16
    fed = Fed(ids, length - 1, seed=11)
    enc = fed.encoded()
    server = ip.setup(tmp_path, "late", t, ids, length)
    requests = ip.mask_step(server, tmp_path, 1, enc, silent=[5])
    replies = ip.unmask_step(server, tmp_path, 1)
    # Node 5 masks after being declared dropped; the server refuses the late input ...
    late_node = _node(tmp_path, "late", 5)
    late_node.receive_keys(1, requests[5]["s_public_keys"], requests[5]["s_share_ciphertexts"])
    late = late_node.mask(1, enc[5])
    with pytest.raises(SecAggError, match="arrived after the survivor list was fixed"):
        server.add_masked(5, late)
    fed.check(server.finish(replies), [1, 2, 3, 4])
    # ... and even a curious server that kept it learns nothing: it can strip node 5's pairwise
    # masks (its round-1 mask key was revealed) but not its self mask.
    sk5 = shamir.combine({h: r["s"][5] for h, r in replies.items()}, t)
    stripped = late["masked"].copy()
    for u in [1, 2, 3, 4]:
        seed = masking.pairwise_seed("late", 1, 5, sk5, u, requests[u]["s_public_keys"][u])
        masking.apply_mask(stripped, seed, -masking.pairwise_sign(5, u))
    assert not np.array_equal(stripped, enc[5])
    # No honest node hands out node 5's self-mask shares afterwards.
    holder = _node(tmp_path, "late", 1)
    with pytest.raises(SecAggError, match=r"nodes \[5\] were declared dropped earlier"):
        holder.unmask(1, [1, 2, 3, 4, 5], [], {v: late["b_shares"][1] for v in [1, 2, 3, 4, 5]})


# ---- node refusals ----------------------------------------------------------------------------


def _round_one(tmp_path: Path, run: str, silent: Iterable[int] = ()) -> tuple[SecAggServer, dict[int, Any], Fed]:
    ids = [1, 2, 3, 4, 5]
    fed = Fed(ids, 4, seed=13)
    server = ip.setup(tmp_path, run, 3, ids, 5)
    ip.mask_step(server, tmp_path, 1, fed.encoded(), silent=silent)
    return server, server.unmask_requests(), fed


def _answer(tmp_path: Path, run: str, round_: int, requests: dict[int, Any]) -> dict[int, Any]:
    return {
        u: _node(tmp_path, run, u).unmask(round_, r["survivors"], r["dropped"], r["b_share_ciphertexts"])
        for u, r in requests.items()
    }


def test_node_refuses_to_reveal_both_shares_of_one_peer(tmp_path: Path) -> None:
    server, reqs, _ = _round_one(tmp_path, "both")
    node = _node(tmp_path, "both", 1)
    cts = reqs[1]["b_share_ciphertexts"]
    with pytest.raises(SecAggError, match=r"nodes \[4\] are listed both as survivors and as dropped"):
        node.unmask(1, [1, 2, 3, 4], [4, 5], cts)
    node.unmask(1, [1, 2, 3, 4, 5], [], cts)  # answers the honest request
    node.unmask(1, [1, 2, 3, 4, 5], [], cts)  # and a re-delivery of it
    with pytest.raises(SecAggError, match="already unmasked with survivors"):
        node.unmask(1, [1, 2, 3, 4], [5], {v: cts[v] for v in [1, 2, 3, 4]})


def test_node_refuses_a_dropped_node_listed_as_survivor_later(tmp_path: Path) -> None:
    server, reqs, fed = _round_one(tmp_path, "rejoin", silent=[5])
    replies = _answer(tmp_path, "rejoin", 1, reqs)
    server.finish(replies)
    assert _node(tmp_path, "rejoin", 1).revealed_mask_keys_of == [5]
    requests = ip.mask_step(server, tmp_path, 2, fed.encoded())
    assert 5 not in requests
    cts = server.unmask_requests()[1]["b_share_ciphertexts"]
    with pytest.raises(SecAggError, match=r"nodes \[5\] were declared dropped earlier"):
        _node(tmp_path, "rejoin", 1).unmask(2, [1, 2, 3, 4, 5], [], {**cts, 5: cts[1]})
    # A mask request that lists node 5 again is refused too.
    with pytest.raises(SecAggError, match=r"nodes \[5\] were declared dropped earlier"):
        _node(tmp_path, "rejoin", 1).receive_keys(3, {5: b"\x09" * 32, 1: b"\x01" * 32}, {5: b"x", 1: b"y"})


def test_node_refuses_replays_wrong_rounds_and_too_few_survivors(tmp_path: Path) -> None:
    server, reqs, fed = _round_one(tmp_path, "replay")
    node = _node(tmp_path, "replay", 2)
    with pytest.raises(SecAggError, match="already masked round 1"):
        node.mask(1, fed.encoded()[2])
    with pytest.raises(SecAggError, match="did not mask round 7"):
        node.unmask(7, [1, 2, 3, 4, 5], [], reqs[2]["b_share_ciphertexts"])
    with pytest.raises(TooFewSurvivors, match="2 survivors listed, threshold is 3"):
        node.unmask(1, [1, 2], [3, 4, 5], {v: reqs[2]["b_share_ciphertexts"][v] for v in [1, 2]})
    with pytest.raises(SecAggError, match="not round 1's active nodes"):
        node.unmask(1, [1, 2, 3], [4], {v: reqs[2]["b_share_ciphertexts"][v] for v in [1, 2, 3]})
    with pytest.raises(SecAggError, match="not listed as a survivor"):
        node.unmask(1, [1, 3, 4, 5], [2], {v: reqs[2]["b_share_ciphertexts"][v] for v in [1, 3, 4, 5]})


# ---- tampering -----------------------------------------------------------------------------------


def test_share_from_another_run_is_detected(tmp_path: Path) -> None:
    ids = [1, 2, 3]
    a = ip.setup(tmp_path, "run-a", 2, ids, 4)
    b = ip.setup(tmp_path, "run-b", 2, ids, 4)
    req_a, req_b = a.start_round(1), b.start_round(1)
    foreign = {**req_b[1]["s_share_ciphertexts"], 2: req_a[1]["s_share_ciphertexts"][2]}
    with pytest.raises(TamperingDetected, match="s-share from node 2 for round 0 failed authentication"):
        _node(tmp_path, "run-b", 1).receive_keys(1, req_b[1]["s_public_keys"], foreign)


def test_replayed_wrong_sender_and_corrupted_shares_are_detected(tmp_path: Path) -> None:
    server, reqs1, _ = _round_one(tmp_path, "tamper")
    replies = _answer(tmp_path, "tamper", 1, reqs1)
    server.finish(replies)
    fed = Fed([1, 2, 3, 4, 5], 4, seed=17)
    ip.mask_step(server, tmp_path, 2, fed.encoded())
    reqs2 = server.unmask_requests()
    good = reqs2[1]["b_share_ciphertexts"]
    node = _node(tmp_path, "tamper", 1)
    replayed = {**good, 3: reqs1[1]["b_share_ciphertexts"][3]}  # round-1 share replayed into round 2
    with pytest.raises(TamperingDetected, match="b-share from node 3 for round 2 failed authentication"):
        node.unmask(2, reqs2[1]["survivors"], [], replayed)
    swapped = {**good, 2: good[4], 4: good[2]}  # shares re-labelled with another sender
    with pytest.raises(TamperingDetected, match="from node 2 for round 2"):
        node.unmask(2, reqs2[1]["survivors"], [], swapped)
    blob = bytearray(good[5])
    blob[-1] ^= 0x01
    with pytest.raises(TamperingDetected, match="b-share from node 5 for round 2 failed authentication"):
        node.unmask(2, reqs2[1]["survivors"], [], {**good, 5: bytes(blob)})
    # Nothing was recorded by the failed attempts: the honest request still works.
    assert set(node.unmask(2, reqs2[1]["survivors"], [], good)["b"]) == {1, 2, 3, 4, 5}


def test_forged_unmask_share_is_detected_by_the_server(tmp_path: Path) -> None:
    server, reqs, _ = _round_one(tmp_path, "forged", silent=[5])
    replies = _answer(tmp_path, "forged", 1, reqs)
    share = bytearray(replies[2]["s"][5])
    share[-1] ^= 0x01
    replies[2]["s"][5] = bytes(share)
    with pytest.raises(TamperingDetected, match="node 5's round-1 mask key"):
        server.finish(replies)


def test_share_keys_rejects_bad_peer_sets(tmp_path: Path) -> None:
    ids = [1, 2, 3]
    pks = {i: SecAggNode(tmp_path / f"{i}.json").advertise("pk", i, 2, ids) for i in ids}
    node = SecAggNode(tmp_path / "1.json")
    with pytest.raises(SecAggError, match="does not include this node"):
        node.share_keys({2: pks[2], 3: pks[3]}, 2)
    with pytest.raises(TamperingDetected, match="duplicated key"):
        node.share_keys({**pks, 3: pks[2]}, 2)
    with pytest.raises(TamperingDetected, match="not the ones it advertised"):
        node.share_keys({**pks, 1: pks[2]}, 2)
    with pytest.raises(SecAggError, match="not in this run"):
        node.share_keys({**pks, 9: {"c_pk": b"\x07" * 32, "s_pk": b"\x08" * 32}}, 2)
    with pytest.raises(SecAggError, match="threshold 3 differs"):
        node.share_keys(pks, 3)
    first = node.share_keys(pks, 2)
    assert SecAggNode(tmp_path / "1.json").share_keys(pks, 2) == first  # re-delivery: same answer
    with pytest.raises(SecAggError, match="different set of public keys"):
        node.share_keys({1: pks[1], 2: pks[2]}, 2)


# ---- state on disk ----------------------------------------------------------------------------------


def test_state_file_is_private_json_and_forgets_used_secrets(tmp_path: Path) -> None:
    server, reqs, _ = _round_one(tmp_path, "state")
    path = ip.state_path(tmp_path, "state", 1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    state = json.loads(path.read_text())
    assert state["format"] == "fedcare-secagg-node/1" and len(state["c_sk"]) == 44  # base64 of 32 bytes
    assert base64.b64decode(state["s_pk"]) != server.public_keys()[1]["s_pk"]  # round-1 mask key gone
    assert not {"b", "b_seed", "seed"} & _all_keys(state)  # the self-mask seed is never stored
    _node(tmp_path, "state", 1).unmask(1, reqs[1]["survivors"], reqs[1]["dropped"], reqs[1]["b_share_ciphertexts"])
    state = json.loads(path.read_text())
    assert state["rounds"]["1"]["shares"] == {}  # held shares deleted once the round is unmasked


def _all_keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _all_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _all_keys(v)}
    return set()


def test_advertise_is_idempotent_and_one_file_serves_one_run(tmp_path: Path) -> None:
    path = tmp_path / "n.json"
    first = SecAggNode(path).advertise(5, 1, 2, [1, 2, 3])
    assert SecAggNode(path).advertise(5, 1, 2, [1, 2, 3]) == first
    with pytest.raises(SecAggError, match="use one state file per run"):
        SecAggNode(path).advertise(6, 1, 2, [1, 2, 3])
    with pytest.raises(SecAggError, match="no secure-aggregation state"):
        SecAggNode(tmp_path / "missing.json").mask(1, np.zeros(3, dtype=np.uint64))


# ---- the server keeps no individual input -----------------------------------------------------------


def _arrays_reachable(obj: Any, seen: set[int] | None = None) -> list[np.ndarray]:
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    found: list[np.ndarray] = []
    children: list[Any] = []
    if isinstance(obj, dict):
        children += list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children += list(obj)
    else:
        children += list(getattr(obj, "__dict__", {}).values())
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if hasattr(obj, slot):
                    children.append(getattr(obj, slot))
    for child in children:
        found += _arrays_reachable(child, seen)
    return found


def test_server_holds_only_the_running_sum(tmp_path: Path) -> None:
    ids, length = [1, 2, 3, 4], 64
    fed = Fed(ids, length - 1, seed=21)
    server = ip.setup(tmp_path, "sum", 3, ids, length)
    requests = server.start_round(1)
    masked = {}
    for nid, req in requests.items():
        node = _node(tmp_path, "sum", nid)
        node.receive_keys(1, req["s_public_keys"], req["s_share_ciphertexts"])
        reply = _node(tmp_path, "sum", nid).mask(1, fed.encoded()[nid])
        masked[nid] = reply["masked"].copy()
        server.add_masked(nid, reply)
        reply["masked"][:] = 0  # the server did not keep a reference to the caller's array
    arrays = _arrays_reachable(server)
    assert len(arrays) == 1 and arrays[0].shape == (length,)  # just the sum
    for y in masked.values():
        assert not any(np.array_equal(a, y) for a in arrays)
    expected = np.zeros(length, dtype=np.uint64)
    for y in masked.values():
        np.add(expected, y, out=expected)
    assert np.array_equal(arrays[0], expected)
    public = [name for name in dir(server) if not name.startswith("_")]
    assert set(public) == {
        "abort_round", "add_masked", "add_public_keys", "add_setup_shares", "dropped", "finish",
        "node_ids", "public_keys", "round", "run_id", "start_round", "survivors", "threshold",
        "unmask_requests", "vector_length",
    }


def test_server_rejects_malformed_or_unexpected_inputs(tmp_path: Path) -> None:
    server, _, fed = _round_one(tmp_path, "bad")
    with pytest.raises(SecAggError, match="arrived after the survivor list was fixed"):
        server.add_masked(1, {"masked": np.zeros(5, dtype=np.uint64)})
    server2 = ip.setup(tmp_path, "bad2", 3, [1, 2, 3, 4, 5], 5)
    reqs = server2.start_round(1)
    node = _node(tmp_path, "bad2", 1)
    node.receive_keys(1, reqs[1]["s_public_keys"], reqs[1]["s_share_ciphertexts"])
    reply = node.mask(1, fed.encoded()[1])
    with pytest.raises(SecAggError, match="must be uint64 of length 5"):
        server2.add_masked(1, {**reply, "masked": reply["masked"].astype(np.int64)})
    with pytest.raises(SecAggError, match="b-shares for"):
        server2.add_masked(1, {**reply, "b_shares": {2: b"x"}})
    with pytest.raises(SecAggError, match="not active in round 1"):
        server2.add_masked(9, reply)
    with pytest.raises(SecAggError, match="still open"):
        server2.start_round(2)
    server2.add_masked("1", reply)  # transport dicts may carry ids as strings
    with pytest.raises(SecAggError, match="already sent"):
        server2.add_masked(1, reply)


def test_substituted_rotated_mask_key_is_detected(tmp_path: Path) -> None:
    server, reqs, fed = _round_one(tmp_path, "swap")
    server.finish(_answer(tmp_path, "swap", 1, reqs))
    req = server.start_round(2)[1]
    forged = {**req["s_public_keys"], 3: req["s_public_keys"][4]}  # server relays a key node 3 never sent
    with pytest.raises(TamperingDetected, match="mask key relayed for node 3 is not the one node 3 shared"):
        _node(tmp_path, "swap", 1).receive_keys(2, forged, req["s_share_ciphertexts"])
    _node(tmp_path, "swap", 1).receive_keys(2, req["s_public_keys"], req["s_share_ciphertexts"])
