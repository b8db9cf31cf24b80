"""The full protocol in-process: correct weighted means with dropouts at every stage, and a coordinator
that deviates gets nothing more than the sum: split views, added nodes, substituted keys, different
survivor lists, tampered shares. Every attack from the review is a test here; the property tests let
hypothesis pick dropout schedules and server behaviours."""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_aggregation import Quantizer, SecAggError, SecAggNode, TamperingDetected, TooFewSurvivors
from secure_aggregation.identity import Roster, RosterConsortium, SimulatedConsortium, public_bytes
from secure_aggregation.node_half import advertisement_message
from secure_aggregation.node_state import unb64
from tests.support import secagg_inprocess as ip

CLIP = 0.5


def _ids(n: int, seed: int | None = None) -> list[int]:
    rng = random.Random(n if seed is None else seed)  # Flower node ids are random uint64 values
    ids: set[int] = set()
    while len(ids) < n:
        ids.add(rng.getrandbits(63))
    return sorted(ids)


def _t(n: int) -> int:
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


def _setup(
    tmp_path: Path,
    ids: list[int],
    length: int,
    t: int | None = None,
    k: int | None = None,
    run: Any = 42,
    after_advertise: Iterable[int] = (),
) -> ip.Federation:
    return ip.setup(
        tmp_path,
        run,
        t or _t(len(ids)),
        k or len(ids) - 1,
        ids,
        length,
        SimulatedConsortium(b"\x01" * 32),
        after_advertise=set(after_advertise),
    )


# ---- correctness with dropouts at every stage ----------------------------------------------------

STAGES = ["after_advertise", "after_share_keys", "after_mask"]
CASES = [("none", "zero")] + [(stage, k) for stage in STAGES for k in ("one", "n-t")]


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize(("stage", "how_many"), CASES)
def test_secure_mean_equals_plain_weighted_mean(tmp_path: Path, n: int, stage: str, how_many: str) -> None:
    ids, t, length = _ids(n), _t(n), 40
    k = {"zero": 0, "one": 1, "n-t": n - t}[how_many]
    gone = set(ids[1 : 1 + k])  # never the first node: keep a mix of smaller/larger ids around
    fed = Fed(ids, length, seed=n)
    federation = _setup(tmp_path, ids, length + 1, after_advertise=gone if stage == "after_advertise" else ())
    silent = gone if stage == "after_share_keys" else set()
    mute = gone if stage == "after_mask" else set()
    total, outcome = ip.run_round(federation, 1, fed.encoded(), silent=silent, mute=mute)
    expected = sorted(set(ids) - gone) if stage != "after_mask" else ids
    assert outcome.survivors == expected and outcome.silent == (sorted(gone) if mute else [])
    fed.check(total, outcome.survivors)
    fed2 = Fed(ids, length, seed=n + 100)  # a second round: rotated mask keys, without the dropped
    total2, outcome2 = ip.run_round(federation, 2, fed2.encoded())
    assert outcome2.survivors == expected
    fed2.check(total2, outcome2.survivors)


@pytest.mark.parametrize("n, k, t", [(30, 8, 6), (60, 12, 8)])
def test_sparse_neighbourhoods_give_the_exact_sum_with_dropouts(tmp_path: Path, n: int, k: int, t: int) -> None:
    ids = _ids(n)
    fed = Fed(ids, 12, seed=n)
    federation = _setup(tmp_path, ids, 13, t=t, k=k)
    assert all(len(h) == k + 1 for h in federation.server.hoods.values())
    total, outcome = ip.run_round(federation, 1, fed.encoded(), silent=ids[3:5], mute=ids[7:8])
    assert outcome.dropped == ids[3:5]
    fed.check(total, outcome.survivors)
    total, outcome = ip.run_round(federation, 2, fed.encoded())
    fed.check(total, outcome.survivors)


def test_ten_nodes_hundred_thousand_elements_with_dropout(tmp_path: Path) -> None:
    ids, length = _ids(10), 100_000
    fed = Fed(ids, length, seed=3)
    federation = _setup(tmp_path, ids, length + 1)
    total, outcome = ip.run_round(federation, 1, fed.encoded(), silent=[ids[4]], mute=[ids[7]])
    assert ids[4] in outcome.dropped and ids[7] in outcome.survivors and outcome.silent == [ids[7]]
    fed.check(total, outcome.survivors)


def test_dropouts_accumulate_over_rounds_and_dropped_nodes_stay_out(tmp_path: Path) -> None:
    ids = _ids(7)
    fed = Fed(ids, 10, seed=9)
    federation = _setup(tmp_path, ids, 11)
    total, outcome = ip.run_round(federation, 1, fed.encoded(), silent=[ids[0]])
    fed.check(total, outcome.survivors)
    requests = ip.mask_step(federation, 2, fed.encoded(), silent=[ids[5]])
    assert ids[0] not in requests  # a dropped node gets no further mask requests
    total, outcome = federation.server.finish(ip.unmask_step(federation, 2, mute=[ids[1]]))
    fed.check(total, outcome.survivors)
    assert federation.server.excluded == sorted([ids[0], ids[5]])
    total, outcome = ip.run_round(federation, 5, fed.encoded())  # round numbers may skip
    fed.check(total, outcome.survivors)
    assert outcome.survivors == sorted(set(ids) - {ids[0], ids[5]})


def test_below_threshold_survivors_raise_and_reveal_nothing(tmp_path: Path) -> None:
    ids = _ids(5)
    fed = Fed(ids, 8, seed=5)
    federation = _setup(tmp_path, ids, 9)
    ip.mask_step(federation, 1, fed.encoded(), silent=ids[2:])
    with pytest.raises(TooFewSurvivors, match="only 2 of 5 nodes sent masked inputs for round 1; the threshold"):
        federation.server.view_requests()
    for nid in ids:  # no node was asked to reveal or sign anything
        state = json.loads(ip.state_path(tmp_path, 42, nid).read_text())
        assert state["revealed_s_for"] == [] and all(r["status"] == "masked" for r in state["rounds"].values())
    federation.server.abort_round()
    with pytest.raises(TooFewSurvivors, match="only 2 nodes hold mask keys for round 2"):
        federation.server.start_round(2)


def test_finish_with_too_few_replies_keeps_the_round_open(tmp_path: Path) -> None:
    ids = _ids(5)
    fed = Fed(ids, 8, seed=6)
    federation = _setup(tmp_path, ids, 9)
    ip.mask_step(federation, 1, fed.encoded())
    replies = ip.unmask_step(federation, 1, mute=ids[2:])
    with pytest.raises(TooFewSurvivors, match=r"only 2 good shares of node .*self-mask seed"):
        federation.server.finish(replies)
    replies.update(ip.unmask_step(federation, 1, mute=ids[:2] + ids[3:]))
    total, _outcome = federation.server.finish(replies)
    fed.check(total, ids)


# ---- identities: the coordinator cannot add, impersonate or substitute ---------------------------


def _advertised(tmp_path: Path, ids: list[int], consortium=None) -> tuple[dict[int, dict], Any]:
    consortium = consortium or SimulatedConsortium(b"\x02" * 32)
    ads = {
        i: SecAggNode(tmp_path / f"{i}.json", consortium).advertise("run", i, ip.name_of(i), 3, len(ids) - 1, ids)
        for i in ids
    }
    return ads, consortium


def test_a_node_the_server_added_or_impersonates_is_refused(tmp_path: Path) -> None:
    ids = [1, 2, 3, 4]
    ads, consortium = _advertised(tmp_path, ids)
    server_key = Ed25519PrivateKey.generate()  # the coordinator's own key: it cannot sign for members
    fake = {**ads[4], "identity": public_bytes(server_key), "name": "hospital-99"}
    fake["sig"] = server_key.sign(advertisement_message("run", 99, fake))
    node = SecAggNode(tmp_path / "1.json", consortium)
    with pytest.raises(TamperingDetected, match="node 99 advertises an identity key that is not 'hospital-99'"):
        node.share_keys({**ads, 99: fake})
    impostor = {**fake, "name": "hospital-4"}  # a second node claiming a member's name
    with pytest.raises(TamperingDetected, match="not 'hospital-4''s on this hospital's roster"):
        node.share_keys({**ads, 99: impostor})
    twice = {**ads, 99: ads[4]}  # a member's signed keys replayed under another node id
    with pytest.raises(TamperingDetected, match="keys of node 99"):
        node.share_keys(twice)
    assert node.share_keys(ads)["participants"]  # the honest key list still works


def test_a_substituted_public_key_is_refused(tmp_path: Path) -> None:
    ids = [1, 2, 3, 4]
    ads, consortium = _advertised(tmp_path, ids)
    server_c = os.urandom(32)
    swapped = {**ads, 3: {**ads[3], "c_pk": ads[2]["c_pk"][:-1] + server_c[:1]}}
    with pytest.raises(TamperingDetected, match="the signature of 'hospital-3' does not verify"):
        SecAggNode(tmp_path / "1.json", consortium).share_keys(swapped)


def test_a_roster_member_only_joins_with_its_own_key(tmp_path: Path) -> None:
    keys = {name: Ed25519PrivateKey.generate() for name in ("Cleveland", "Hungary", "Zurich")}
    roster_path = tmp_path / "roster.toml"
    roster_path.write_text(Roster.text({n: public_bytes(k) for n, k in keys.items()}))
    roster = Roster.load(roster_path)
    for name, key in keys.items():
        from cryptography.hazmat.primitives import serialization

        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    members = {name: RosterConsortium(roster, tmp_path / f"{name}.key") for name in keys}
    ids = {"Cleveland": 5, "Hungary": 6, "Zurich": 7}
    ads = {
        ids[n]: SecAggNode(tmp_path / f"{n}.json", members[n]).advertise("r", ids[n], n, 2, 2, list(ids.values()))
        for n in keys
    }
    assert SecAggNode(tmp_path / "Cleveland.json", members["Cleveland"]).share_keys(ads)
    with pytest.raises(SecAggError, match="'Basel' is not on this hospital's own consortium roster"):
        SecAggNode(tmp_path / "Basel.json", RosterConsortium(roster, tmp_path / "Zurich.key")).advertise(
            "r", 8, "Basel", 2, 2, [5, 6, 7, 8]
        )
    with pytest.raises(SecAggError, match="identity key is not the one the roster lists for 'Hungary'"):
        SecAggNode(tmp_path / "x.json", RosterConsortium(roster, tmp_path / "Zurich.key")).advertise(
            "r", 6, "Hungary", 2, 2, [5, 6, 7]
        )


def test_nodes_told_a_different_federation_refuse(tmp_path: Path) -> None:
    consortium = SimulatedConsortium(b"\x03" * 32)
    ids = [1, 2, 3, 4, 5]
    ads = {
        i: SecAggNode(tmp_path / f"{i}.json", consortium).advertise(
            "run", i, ip.name_of(i), 3, 4, ids if i != 5 else [1, 2, 3, 5]
        )
        for i in ids
    }
    with pytest.raises(TamperingDetected, match="node 5 was told a different federation"):
        SecAggNode(tmp_path / "1.json", consortium).share_keys(ads)


def test_a_federation_below_the_hospitals_minimum_or_a_minority_threshold_is_refused(tmp_path: Path) -> None:
    ads, consortium = _advertised(tmp_path, [1, 2, 3, 4])
    with pytest.raises(
        SecAggError, match="only 4 verified members advertised keys; it joins federations of at least 5"
    ):
        SecAggNode(tmp_path / "1.json", consortium).share_keys(ads, min_nodes=5)
    with pytest.raises(SecAggError, match="threshold 2 is invalid for neighbourhoods of 4"):
        SecAggNode(tmp_path / "9.json", consortium).advertise("run", 9, "x", 2, 3, [9, 1, 2, 3])
    with pytest.raises(SecAggError, match="at least 4"):
        SecAggNode(tmp_path / "8.json", consortium).advertise("run", 8, "x", 3, 3, [8, 1, 2, 3], floor=4)


# ---- one view per round, and never both masks ------------------------------------------------------


def _round_one(tmp_path: Path, n: int = 7, silent: Iterable[int] = ()) -> tuple[ip.Federation, list[int], Fed]:
    ids = _ids(n, seed=123)
    fed = Fed(ids, 4, seed=13)
    federation = _setup(tmp_path, ids, 5)
    ip.mask_step(federation, 1, fed.encoded(), silent=silent)
    return federation, ids, fed


def test_different_survivor_lists_to_different_nodes_are_refused(tmp_path: Path) -> None:
    federation, ids, _ = _round_one(tmp_path)
    node = federation.node(ids[0])
    first = node.sign_view(1, ids[:5])
    assert federation.node(ids[0]).sign_view(1, ids[:5]) == first  # re-delivery: the same signature
    with pytest.raises(SecAggError, match="already signed another view of round 1"):
        federation.node(ids[0]).sign_view(1, ids[:6])
    with pytest.raises(SecAggError, match="signed no view, or another one"):
        federation.node(ids[0]).unmask(1, ids[:6], {}, {}, {})
    with pytest.raises(SecAggError, match="already took round 1's consistency path"):
        federation.node(ids[0]).unmask_fast(1, {}, {})
    federation.node(ids[1]).unmask_fast(1, {}, {})
    with pytest.raises(SecAggError, match="already revealed round 1's self-mask shares on the fast path"):
        federation.node(ids[1]).sign_view(1, ids[:5])


def test_a_view_without_enough_signatures_reveals_nothing(tmp_path: Path) -> None:
    federation, ids, _ = _round_one(tmp_path)
    view = ids[:5]
    sigs = {i: federation.node(i).sign_view(1, view) for i in view[:3]}  # 3 < t = 4
    with pytest.raises(SecAggError, match=r"only 3 members of node .*neighbourhood signed this view"):
        federation.node(view[0]).unmask(1, view, sigs, {}, {})
    forged = {**sigs, view[3]: sigs[view[0]]}  # a signature passed off as another node's
    with pytest.raises(SecAggError, match="only 3 members"):
        federation.node(view[0]).unmask(1, view, forged, {}, {})


def test_a_share_tampered_by_one_hospital_is_discarded_and_its_sender_named(tmp_path: Path) -> None:
    ids = _ids(7)
    fed = Fed(ids, 6, seed=31)
    federation = _setup(tmp_path, ids, 7)
    ip.mask_step(federation, 1, fed.encoded(), silent=[ids[6]])  # a dropout: the consistency path
    replies = ip.unmask_step(federation, 1)
    liar = ids[2]
    share = bytearray(replies[liar]["b"][ids[0]])
    share[5] ^= 0x40
    replies[liar]["b"][ids[0]] = bytes(share)
    key_share = bytearray(replies[liar]["s"][ids[6]])
    key_share[9] ^= 0x01
    replies[liar]["s"][ids[6]] = bytes(key_share)
    total, outcome = federation.server.finish(replies)
    assert set(outcome.blamed) == {liar}
    assert "never dealt" in outcome.blamed[liar]
    fed.check(total, outcome.survivors)  # the round completed with the good shares
    assert liar in federation.server.excluded  # and the run continues without the offender
    requests = ip.mask_step(federation, 2, fed.encoded())
    assert liar not in requests


def test_a_malformed_unmask_reply_names_its_sender_and_the_round_completes(tmp_path: Path) -> None:
    ids = _ids(6)
    fed = Fed(ids, 6, seed=32)
    federation = _setup(tmp_path, ids, 7)
    ip.mask_step(federation, 1, fed.encoded())
    replies = ip.unmask_step(federation, 1)
    replies[ids[1]] = {"b": {ids[0]: b"short"}}
    total, outcome = federation.server.finish(replies)
    assert "malformed share" in outcome.blamed[ids[1]]
    fed.check(total, outcome.survivors)


def test_a_dealer_whose_own_shares_do_not_reconstruct_fails_the_round_by_name(tmp_path: Path, monkeypatch) -> None:
    """A hospital deals shares of its self-mask seed from two different polynomials (each committed
    to as dealt, so every holder accepts its own): the seed cannot be rebuilt; the dealer is named."""
    from secure_aggregation import node_half, shamir

    ids = _ids(5)
    fed = Fed(ids, 6, seed=33)
    federation = _setup(tmp_path, ids, 7)
    requests = federation.server.start_round(1)
    cheat = ids[3]
    honest_split = shamir.split
    for nid, req in requests.items():
        federation.node(nid).receive_keys(1, req["peers"])
        if nid == cheat:

            def inconsistent(secret, t, holders):
                shares = honest_split(secret, t, holders)
                if len(secret) == 32 and holders:  # the self-mask seed: one share from another polynomial
                    shares[holders[0]] = honest_split(bytes(32), t, holders)[holders[0]]
                return shares

            monkeypatch.setattr(node_half.shamir, "split", inconsistent)
        reply = federation.node(nid).mask(1, fed.encoded()[nid])
        monkeypatch.setattr(node_half.shamir, "split", shamir.split)
        federation.server.add_masked(nid, reply)
    with pytest.raises(TamperingDetected, match=f"node {cheat} dealt shares of its self-mask seed") as exc:
        federation.server.finish(ip.unmask_step(federation, 1))
    assert exc.value.blame == [cheat]


def test_the_late_input_of_a_dropped_node_stays_masked(tmp_path: Path) -> None:
    federation, ids, _fed = _round_one(tmp_path, n=5, silent=[])
    # the coordinator claims the last node dropped although its input arrived: the consistency path
    last = ids[-1]
    view = ids[:-1]
    sigs = {i: federation.node(i).sign_view(1, view) for i in view}
    rnd = federation.server._round
    b_cts = {h: {w: rnd.b_cts[w][h] for w in view} for h in view}
    replies = {
        h: federation.node(h).unmask(1, view, sigs, b_cts[h], {w: rnd.statements[w] for w in view}) for h in view
    }
    assert all(set(r["s"]) == {last} and set(r["b"]) == set(view) for r in replies.values())
    # nobody reveals the last node's self mask now: the fast path is closed for every signer ...
    for h in view:
        with pytest.raises(SecAggError, match="consistency path"):
            federation.node(h).unmask_fast(1, {last: rnd.b_cts[last][h]}, {last: rnd.statements[last]})
    # ... and the last node itself never signed a view without itself
    with pytest.raises(SecAggError, match="not listed as a survivor"):
        federation.node(last).sign_view(1, view)


# ---- the coordinator as an adversary: it never gets both masks of an honest node -------------------


class Attacker:
    """A coordinator that asks any node anything, in any order, and pools every share it gets.

    ``colluders`` hand over every share they hold. ``exposed`` is the property under test: the
    attacker can remove both the self mask of an honest node whose input it holds and every pairwise
    mask that node added with an honest peer.
    """

    def __init__(self, federation: ip.Federation, round_: int, colluders: Iterable[int] = ()) -> None:
        self.fed, self.r = federation, round_
        self.rnd = federation.server._round
        self.colluders = set(colluders)
        self.b: dict[int, set[int]] = defaultdict(set)
        self.s: dict[int, set[int]] = defaultdict(set)
        self.sigs: dict[tuple[int, ...], dict[int, bytes]] = defaultdict(dict)
        for c in self.colluders:
            state = json.loads(ip.state_path(federation.state_dir, federation.run_id, c).read_text())
            for owner in state["rounds"].get(str(round_), {}).get("shares", {}):
                self.s[int(owner)].add(c)
            for owner in self.rnd.peers.get(c, []):
                self.b[owner].add(c)

    def _b_cts(self, h: int, owners: Iterable[int]) -> dict[int, bytes]:
        return {w: self.rnd.b_cts[w][h] for w in owners if w in self.rnd.b_cts and h in self.rnd.b_cts[w]}

    def _statements(self, owners: Iterable[int]) -> dict[int, dict]:
        return {w: self.rnd.statements[w] for w in owners if w in self.rnd.statements}

    def fast(self, h: int) -> None:
        try:
            reply = self.fed.node(h).unmask_fast(
                self.r, self._b_cts(h, self.rnd.peers[h]), self._statements(self.rnd.peers[h])
            )
        except SecAggError:
            return
        for w in reply["b"]:
            self.b[w].add(h)

    def sign(self, h: int, view: tuple[int, ...]) -> None:
        with contextlib.suppress(SecAggError):
            self.sigs[view][h] = self.fed.node(h).sign_view(self.r, list(view))

    def unmask(self, h: int, view: tuple[int, ...]) -> None:
        try:
            reply = self.fed.node(h).unmask(
                self.r, list(view), self.sigs[view], self._b_cts(h, view), self._statements(view)
            )
        except SecAggError:
            return
        for w in reply["b"]:
            self.b[w].add(h)
        for w in reply["s"]:
            self.s[w].add(h)

    def exposed(self) -> list[int]:
        t = self.fed.server.threshold
        found = []
        for w in self.rnd.contributors:
            if w in self.colluders or len(self.b[w]) < t:
                continue
            honest_peers = [v for v in self.rnd.peers[w] if v != w and v not in self.colluders]
            if all(len(self.s[v]) >= t for v in honest_peers):
                found.append(w)
        return found

    def both_from_one_holder(self) -> list[tuple[int, int]]:
        return [(h, w) for w in self.b for h in self.b[w] & self.s.get(w, set()) if h not in self.colluders]


@pytest.mark.parametrize("n", [7, 8, 9, 10, 11, 12])
def test_the_split_view_attack_recovers_no_update(tmp_path: Path, n: int) -> None:
    """The review's attack: the target's self-mask shares from nodes told it survived, its peers'
    mask keys from nodes told they dropped. Every split of the other nodes into those two groups is
    tried (views sized to pass each node's own checks); no split exposes the target."""
    federation, ids, _ = _round_one(tmp_path, n=n)
    target, others = ids[0], ids[1:]
    t = federation.server.threshold
    rng = random.Random(n)
    for attempt in range(12):
        attacker = Attacker(federation, 1)
        rng.shuffle(others)
        cut = rng.randint(1, len(others) - 1)
        alive, told_dropped = others[:cut], others[cut:]
        view_target = tuple(sorted({target, *alive} | set(rng.sample(others, max(0, t - 1 - len(alive))))))
        view_peers = tuple(sorted(set(told_dropped) | set(rng.sample(alive, max(0, t - len(told_dropped))))))
        for h in alive:
            attacker.sign(h, view_target)
        for h in told_dropped:
            attacker.sign(h, view_peers)
        for h in ids:
            attacker.unmask(h, view_target)
            attacker.unmask(h, view_peers)
            attacker.fast(h)
        assert attacker.exposed() == [] and attacker.both_from_one_holder() == []
        federation, ids, _ = _round_one(tmp_path / f"a{attempt}", n=n)
        target, others = ids[0], ids[1:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_schedule_of_requests_exposes_an_honest_node(tmp_path_factory, data) -> None:
    n = data.draw(st.integers(5, 9), label="n")
    corrupt = data.draw(st.integers(0, 1), label="colluders")
    ids = _ids(n, seed=data.draw(st.integers(0, 10**6)))
    t = max(_t(n), (n + corrupt) // 2 + 1)
    folder = tmp_path_factory.mktemp("schedule")
    federation = ip.setup(folder, 7, t, n - 1, ids, 4, SimulatedConsortium(b"\x04" * 32))
    silent = data.draw(st.sets(st.sampled_from(ids), max_size=n - t), label="silent")
    ip.mask_step(federation, 1, Fed(ids, 3, seed=1).encoded(), silent=silent)
    attacker = Attacker(
        federation,
        1,
        colluders=data.draw(st.sets(st.sampled_from(ids), min_size=corrupt, max_size=corrupt), label="colluders"),
    )
    views = [
        tuple(sorted(data.draw(st.sets(st.sampled_from(ids), min_size=1), label=f"view {i}")))
        for i in range(data.draw(st.integers(1, 3), label="views"))
    ]
    for _ in range(data.draw(st.integers(1, 3 * n), label="requests")):
        h = data.draw(st.sampled_from(ids), label="node")
        action = data.draw(st.sampled_from(["fast", "sign", "unmask"]), label="action")
        view = data.draw(st.sampled_from(views), label="which view")
        if action == "fast":
            attacker.fast(h)
        elif action == "sign":
            attacker.sign(h, view)
        else:
            attacker.unmask(h, view)
    for h in ids:  # finally everyone is asked everything once more
        for view in views:
            attacker.unmask(h, view)
        attacker.fast(h)
    assert attacker.exposed() == []
    assert attacker.both_from_one_holder() == []


# ---- state on disk ---------------------------------------------------------------------------------


def _all_keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _all_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _all_keys(v)}
    return set()


def test_state_file_is_private_json_and_forgets_used_secrets(tmp_path: Path) -> None:
    federation, ids, _ = _round_one(tmp_path)
    path = ip.state_path(tmp_path, 42, ids[0])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    state = json.loads(path.read_text())
    assert state["format"] == "fedcare-secagg-node/1" and len(state["c_sk"]) == 44
    assert unb64(state["s_pk"]) != federation.server._round.keys[ids[0]]  # round-1 mask key already gone
    assert not {"b", "b_seed", "seed"} & _all_keys(state)  # the self-mask seed is never stored
    rnd = federation.server._round
    federation.node(ids[0]).unmask_fast(
        1, {w: rnd.b_cts[w][ids[0]] for w in rnd.peers[ids[0]]}, {w: rnd.statements[w] for w in rnd.peers[ids[0]]}
    )
    assert json.loads(path.read_text())["rounds"]["1"]["shares"] == {}


def test_advertise_is_idempotent_and_one_file_serves_one_run(tmp_path: Path) -> None:
    consortium = SimulatedConsortium(b"\x05" * 32)
    path = tmp_path / "n.json"
    first = SecAggNode(path, consortium).advertise(5, 1, "a", 2, 2, [1, 2, 3])
    assert SecAggNode(path, consortium).advertise(5, 1, "a", 2, 2, [1, 2, 3]) == first
    with pytest.raises(SecAggError, match="a new run uses a new state file"):
        SecAggNode(path, consortium).advertise(6, 1, "a", 2, 2, [1, 2, 3])
    with pytest.raises(SecAggError, match="no secure-aggregation state"):
        SecAggNode(tmp_path / "missing.json", consortium).mask(1, np.zeros(3, dtype=np.uint64))


def test_server_holds_only_the_running_sum(tmp_path: Path) -> None:
    ids, length = _ids(4), 64
    fed = Fed(ids, length - 1, seed=21)
    federation = _setup(tmp_path, ids, length)
    requests = federation.server.start_round(1)
    masked = {}
    for nid, req in requests.items():
        federation.node(nid).receive_keys(1, req["peers"])
        reply = federation.node(nid).mask(1, fed.encoded()[nid])
        masked[nid] = reply["masked"].copy()
        federation.server.add_masked(nid, reply)
        reply["masked"][:] = 0
    arrays = [a for a in _arrays_reachable(federation.server) if a.size > 1]
    assert len(arrays) == 1 and arrays[0].shape == (length,)
    for y in masked.values():
        assert not any(np.array_equal(a, y) for a in arrays)


def _arrays_reachable(obj: Any, seen: set[int] | None = None) -> list[np.ndarray]:
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    children: list[Any] = []
    if isinstance(obj, dict):
        children += list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children += list(obj)
    else:
        children += list(getattr(obj, "__dict__", {}).values())
        for cls in type(obj).__mro__:
            children += [getattr(obj, slot) for slot in getattr(cls, "__slots__", ()) if hasattr(obj, slot)]
    return [a for child in children for a in _arrays_reachable(child, seen)]


def test_server_rejects_malformed_or_unexpected_inputs(tmp_path: Path) -> None:
    ids = _ids(5)
    fed = Fed(ids, 4, seed=41)
    federation = _setup(tmp_path, ids, 5)
    reqs = federation.server.start_round(1)
    node = federation.node(ids[0])
    node.receive_keys(1, reqs[ids[0]]["peers"])
    reply = federation.node(ids[0]).mask(1, fed.encoded()[ids[0]])
    with pytest.raises(SecAggError, match="not uint64 of length 5"):
        federation.server.add_masked(ids[0], {**reply, "masked": reply["masked"].astype(np.int64)})
    with pytest.raises(SecAggError, match="dealt self-mask shares to"):
        federation.server.add_masked(ids[0], {**reply, "b_shares": {ids[1]: b"x"}})
    with pytest.raises(SecAggError, match="masked with"):
        federation.server.add_masked(ids[0], {**reply, "active": ids[:3]})
    with pytest.raises(SecAggError, match="is not expected"):
        federation.server.add_masked(9, reply)
    with pytest.raises(SecAggError, match="still open"):
        federation.server.start_round(2)
    federation.server.add_masked(str(ids[0]), reply)  # transport dicts may carry ids as strings
    with pytest.raises(SecAggError, match="is not expected"):
        federation.server.add_masked(ids[0], reply)


def test_a_substituted_rotated_mask_key_or_share_is_detected(tmp_path: Path) -> None:
    ids = _ids(5)
    fed = Fed(ids, 4, seed=42)
    federation = _setup(tmp_path, ids, 5)
    ip.run_round(federation, 1, fed.encoded())
    peers = federation.server.start_round(2)[ids[0]]["peers"]
    a, b = ids[2], ids[3]
    forged = {**peers, a: {**peers[a], "s_pk": peers[b]["s_pk"]}}  # a key node a never announced
    with pytest.raises(TamperingDetected, match=f"statement of node {a}"):
        federation.node(ids[0]).receive_keys(2, forged)
    swapped = {**peers, a: {**peers[a], "ct": peers[b]["ct"]}}  # another dealer's share relabelled
    with pytest.raises(TamperingDetected, match=f"from node {a}"):
        federation.node(ids[0]).receive_keys(2, swapped)
    # the commitments node a signed, with the one to this node's share replaced, or cut short
    blob = bytearray(peers[a]["s_commits"])
    blob[-1] ^= 1
    for commits in (bytes(blob), bytes(blob[:-1])):
        with pytest.raises(TamperingDetected, match=f"node {a}"):
            federation.node(ids[0]).receive_keys(2, {**peers, a: {**peers[a], "s_commits": commits}})
    federation.node(ids[0]).receive_keys(2, peers)  # the honest request still works


def test_packed_commitments_find_every_holder_and_only_in_order() -> None:
    from secure_aggregation import commitments

    commits = {h: bytes([h % 256]) * 32 for h in (7, 2**63 + 5, 3, 1000)}
    blob = commitments.pack(commits)
    assert all(commitments.lookup(blob, h) == c for h, c in commits.items())
    assert commitments.lookup(blob, 4) is None and commitments.lookup(b"", 3) is None
    assert commitments.unpack(blob, sorted(commits), "x") == commits
    with pytest.raises(SecAggError, match="do not cover the nodes it dealt to"):
        commitments.unpack(blob, sorted(commits)[:-1], "x")
    reordered = blob[48:96] + blob[:48] + blob[96:]
    with pytest.raises(SecAggError, match="in order"):
        commitments.unpack(reordered, sorted(commits), "x")
    with pytest.raises(SecAggError, match="not packed share commitments"):
        commitments.checked(blob[:-1], "x")


def test_a_share_from_another_run_is_detected(tmp_path: Path) -> None:
    ids = _ids(3)
    fa = _setup(tmp_path, ids, 4, run="run-a")
    fb = _setup(tmp_path, ids, 4, run="run-b")
    pa, pb = fa.server.start_round(1)[ids[0]]["peers"], fb.server.start_round(1)[ids[0]]["peers"]
    foreign = {**pb, ids[1]: {**pb[ids[1]], "ct": pa[ids[1]]["ct"]}}
    with pytest.raises(TamperingDetected, match=f"s-share from node {ids[1]} for round 0 failed authentication"):
        fb.node(ids[0]).receive_keys(1, foreign)
