"""The node (hospital) half of secure aggregation: keys, shares, masking and guarded unmasking.

One ``SecAggNode`` is one node in one run. Every step loads the state file, checks that the
step is allowed, does its work and writes the state back atomically before returning, so each
step works in a fresh process and a crash never leaves the node half-way through a reveal.

Mask keys rotate every round (see the package docstring): the key used to mask round r is
announced in the previous round (or at setup), and its Shamir shares travel with it. A node
deletes its private mask key as soon as it has masked with it and deletes the shares it holds
for a round once that round is unmasked, so a later theft of the state file reveals nothing
about earlier rounds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secure_aggregation import keys, masking, node_state, shamir, validation
from secure_aggregation.errors import SecAggError, TamperingDetected, TooFewSurvivors
from secure_aggregation.node_state import b64, unb64
from secure_aggregation.prg import SEED_BYTES
from secure_aggregation.validation import by_node, check_threshold, ciphertext, node_ids

SETUP_ROUND = 0
STAGE_S_SHARE = "s-share"
STAGE_B_SHARE = "b-share"


def _keys_digest(public_keys: Mapping[int, Mapping[str, bytes]]) -> str:
    h = hashlib.sha256()
    for nid in sorted(public_keys):
        h.update(f"{nid}:".encode() + public_keys[nid]["c_pk"] + public_keys[nid]["s_pk"])
    return h.hexdigest()


def _ids_json(ids: Iterable[int]) -> list[int]:
    return sorted(int(i) for i in ids)


class SecAggNode:
    """One node's side of secure aggregation for one run; state lives in ``state_path``.

    Keep ``state_path`` in the hospital's private state directory, one file per run: it holds
    the node's private keys.
    """

    def __init__(self, state_path: str | os.PathLike[str]) -> None:
        self.path = Path(state_path)
        self._state: dict[str, Any] | None = node_state.load(self.path)
        self._enc_keys: dict[int, bytes] = {}  # per peer, for this object's lifetime (one step)

    # ---- small helpers -------------------------------------------------------------------

    @property
    def node_id(self) -> int:
        """This node's id (after advertise)."""
        return int(self._st()["node_id"])

    @property
    def run_id(self) -> keys.RunId:
        """The run this state belongs to (after advertise)."""
        return self._st()["run_id"]

    @property
    def revealed_mask_keys_of(self) -> list[int]:
        """Peers whose mask-key share this node revealed (dropped for the rest of the run)."""
        return _ids_json(self._st()["revealed_s_for"])

    def _st(self) -> dict[str, Any]:
        if self._state is None:
            raise SecAggError(f"no secure-aggregation state at {self.path}", "call advertise() first")
        return self._state

    def _save(self) -> None:
        node_state.save(self.path, self._st())

    def _refuse(self, reason: str, hint: str = "") -> SecAggError:
        st = self._st()
        return SecAggError(f"node {st['node_id']} (run {st['run_id']}) refuses: {reason}", hint)

    def _enc_key(self, peer: int) -> bytes:
        if peer not in self._enc_keys:
            st = self._st()
            peer_c = unb64(st["peers"][str(peer)]["c_pk"])
            shared = keys.agree(unb64(st["c_sk"]), peer_c, peer=peer)
            self._enc_keys[peer] = keys.encryption_key(shared, st["run_id"], st["node_id"], peer)
        return self._enc_keys[peer]

    def _seal_to(self, peer: int, plaintext: bytes, round_: int, stage: str) -> bytes:
        st = self._st()
        return keys.seal(self._enc_key(peer), plaintext, keys.aad(st["run_id"], round_, stage, st["node_id"], peer))

    def _open_from(self, sender: int, blob: object, round_: int, stage: str) -> bytes:
        st = self._st()
        data = ciphertext(blob, f"{stage} from node {sender}")
        return keys.open_share(self._enc_key(sender), data, st["run_id"], round_, stage, sender, st["node_id"])

    # ---- setup, exchange 1 -----------------------------------------------------------------

    def advertise(
        self, run_id: keys.RunId, node_id: int, threshold: int, all_node_ids: Sequence[int] | None = None
    ) -> dict[str, bytes]:
        """Create this run's key pairs and return the public ones: {"c_pk", "s_pk"} (32 bytes each).

        c is for encrypting shares to peers, s is the mask key of the first masked round.
        Calling it again for the same run returns the same keys (message re-delivery).
        """
        me = validation.node_id(node_id)
        if not isinstance(run_id, (int, str)) or isinstance(run_id, bool):
            raise SecAggError(f"run id must be an int or str, got {run_id!r}")
        expected = node_ids(all_node_ids, "all_node_ids") if all_node_ids is not None else None
        if expected is not None:
            if me not in expected:
                raise SecAggError(f"node {me} is not among the run's nodes {expected}")
            check_threshold(threshold, len(expected))
        elif isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
            raise SecAggError(f"secagg threshold must be an int >= 2, got {threshold!r}")
        if self._state is not None:
            st = self._state
            if st["run_id"] != run_id or st["node_id"] != me or st["threshold"] != threshold:
                raise SecAggError(
                    f"{self.path} holds node {st['node_id']}'s state for run {st['run_id']} "
                    f"(threshold {st['threshold']}), not node {me} in run {run_id} (threshold {threshold})",
                    "use one state file per run and node, e.g. <private-state-dir>/secagg-<run_id>.json",
                )
            return {"c_pk": unb64(st["c_pk"]), "s_pk": unb64(st["s_pk"])}
        c_sk, c_pk = keys.generate_keypair()
        s_sk, s_pk = keys.generate_keypair()
        self._state = {
            "run_id": run_id,
            "node_id": me,
            "threshold": threshold,
            "expected_nodes": expected,
            "c_sk": b64(c_sk),
            "c_pk": b64(c_pk),
            "s_sk": b64(s_sk),  # private mask key for the next round this node masks
            "s_pk": b64(s_pk),
            "peers": None,  # {id: {"c_pk", "s_pk"}} of the setup participants
            "setup": None,  # what share_keys sent, for idempotent re-delivery
            "incoming": None,  # received mask keys + my shares of them, for the next round
            "last_masked_round": None,
            "rounds": {},
            "revealed_s_for": [],
        }
        self._save()
        return {"c_pk": c_pk, "s_pk": s_pk}

    # ---- setup, exchange 2 -----------------------------------------------------------------

    def share_keys(self, public_keys: Mapping[Any, Mapping[str, bytes]], threshold: int) -> dict[int, bytes]:
        """Shamir-split this node's first mask key among all participants, each share encrypted to
        its recipient; returns {recipient_id: ciphertext} (including one to itself).
        """
        st = self._st()
        if threshold != st["threshold"]:
            raise self._refuse(f"threshold {threshold} differs from the {st['threshold']} agreed at advertise")
        peers = self._check_public_keys(public_keys)
        digest = _keys_digest(peers)
        if st["setup"] is not None:
            if st["setup"]["digest"] != digest:
                raise self._refuse(
                    "setup was already done with a different set of public keys",
                    "a run's setup happens once; start a new run with a new state file",
                )
            return {int(k): unb64(v) for k, v in st["setup"]["ciphertexts"].items()}
        st["peers"] = {str(i): {"c_pk": b64(p["c_pk"]), "s_pk": b64(p["s_pk"])} for i, p in peers.items()}
        holders = sorted(peers)
        shares = shamir.split(unb64(st["s_sk"]), st["threshold"], holders)
        s_pk = unb64(st["s_pk"])  # sealed with each share, so holders can check the relayed key
        out = {v: self._seal_to(v, shares[v] + s_pk, SETUP_ROUND, STAGE_S_SHARE) for v in holders}
        st["setup"] = {"digest": digest, "ciphertexts": {str(v): b64(c) for v, c in out.items()}}
        self._save()
        return out

    def _check_public_keys(self, public_keys: Mapping[Any, Mapping[str, bytes]]) -> dict[int, dict[str, bytes]]:
        st = self._st()
        me = st["node_id"]
        raw = by_node(public_keys, "public_keys")
        peers: dict[int, dict[str, bytes]] = {}
        for nid, entry in raw.items():
            if not isinstance(entry, Mapping) or "c_pk" not in entry or "s_pk" not in entry:
                raise self._refuse(f"public keys of node {nid} lack c_pk/s_pk")
            peers[nid] = {
                "c_pk": keys.check_key_bytes(entry["c_pk"], f"c_pk of node {nid}"),
                "s_pk": keys.check_key_bytes(entry["s_pk"], f"s_pk of node {nid}"),
            }
        if me not in peers:
            raise self._refuse("the public key set does not include this node")
        if peers[me]["c_pk"] != unb64(st["c_pk"]) or peers[me]["s_pk"] != unb64(st["s_pk"]):
            raise TamperingDetected(
                f"the public keys listed for node {me} are not the ones it advertised",
                "the key list was altered in transit; restart the run's setup",
            )
        if st["expected_nodes"] is not None and not set(peers) <= set(st["expected_nodes"]):
            extra = sorted(set(peers) - set(st["expected_nodes"]))
            raise self._refuse(f"the public key set lists nodes {extra} that are not in this run")
        all_keys = [p[k] for p in peers.values() for k in ("c_pk", "s_pk")]
        if len(set(all_keys)) != len(all_keys):
            raise TamperingDetected(
                "the public key set contains a duplicated key (two nodes, or c and s of one node, share a key)",
                "restart the run's setup; a key must never be reused",
            )
        if len(peers) < st["threshold"]:
            raise TooFewSurvivors(
                f"only {len(peers)} nodes advertised keys but the threshold is {st['threshold']}",
                "wait for more hospitals or lower the threshold",
            )
        check_threshold(st["threshold"], len(peers))
        return peers

    # ---- receiving mask keys (setup shares, or the rotated keys of the previous round) -------

    def receive_setup_shares(self, ciphertexts: Mapping[Any, bytes]) -> None:
        """Decrypt and keep this node's shares of the participants' first mask keys.

        The senders become the first round's active set. Raises TamperingDetected naming the
        sender of any share that fails authentication.
        """
        st = self._st()
        if st["peers"] is None:
            raise self._refuse("setup shares arrived before share_keys", "run share_keys first")
        if st["last_masked_round"] is not None:
            raise self._refuse("setup shares arrived after the first masked round")
        cts = by_node(ciphertexts, "setup share ciphertexts")
        pks = {v: unb64(st["peers"][str(v)]["s_pk"]) for v in cts if str(v) in st["peers"]}
        self._store_incoming(None, pks, cts, SETUP_ROUND, allowed=[int(k) for k in st["peers"]])

    def receive_keys(
        self, round_: int, s_public_keys: Mapping[Any, bytes], s_share_ciphertexts: Mapping[Any, bytes]
    ) -> None:
        """Take the mask keys for ``round_`` from the server's mask request.

        ``s_public_keys``: the active nodes' public mask keys for this round; ``s_share_ciphertexts``:
        this node's encrypted shares of their private mask keys. For the first masked round these
        are the setup keys and shares; later they are the keys announced in the previous round.
        """
        st = self._st()
        r = self._check_round_number(round_)
        pks = {
            v: keys.check_key_bytes(pk, f"s_pk of node {v}")
            for v, pk in by_node(s_public_keys, "s_public_keys").items()
        }
        cts = by_node(s_share_ciphertexts, "s_share_ciphertexts")
        if set(pks) != set(cts):
            raise self._refuse("the mask request's public keys and share ciphertexts name different nodes")
        if st["last_masked_round"] is None:
            if st["peers"] is None:
                raise self._refuse("mask keys arrived before share_keys", "run the setup first")
            for v, pk in pks.items():
                known = st["peers"].get(str(v))
                if known is None or unb64(known["s_pk"]) != pk:
                    raise TamperingDetected(
                        f"the first-round mask key of node {v} differs from the one it advertised",
                        "the mask request was altered; restart the run's setup",
                    )
            self._store_incoming(r, pks, cts, SETUP_ROUND, allowed=[int(k) for k in st["peers"]])
        else:
            prev = st["last_masked_round"]
            allowed = st["rounds"][str(prev)]["active"]
            self._store_incoming(r, pks, cts, prev, allowed=allowed)

    def _store_incoming(
        self, round_: int | None, pks: dict[int, bytes], cts: dict[int, Any], sent_round: int, allowed: Sequence[int]
    ) -> None:
        st = self._st()
        me = st["node_id"]
        if me not in cts:
            raise self._refuse("the mask keys do not include this node's own share")
        banned = sorted(set(cts) & set(st["revealed_s_for"]))
        if banned:
            raise self._refuse(
                f"nodes {banned} were declared dropped earlier (their mask keys are public) and cannot rejoin"
            )
        outsiders = sorted(set(cts) - set(allowed))
        if outsiders:
            raise self._refuse(f"mask keys from nodes {outsiders} that did not take part in the previous step")
        if pks.get(me) != unb64(st["s_pk"]):
            raise TamperingDetected(
                f"the mask key listed for node {me} is not its own",
                "the mask request was altered in transit",
            )
        if len(cts) < st["threshold"]:
            raise TooFewSurvivors(
                f"only {len(cts)} nodes hold mask keys for the next round but the threshold is {st['threshold']}",
                "the run cannot continue; start a new run",
            )
        shares: dict[int, bytes] = {}
        for v, blob in sorted(cts.items()):
            plain = self._open_from(v, blob, sent_round, STAGE_S_SHARE)
            share, sealed_pk = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            if len(share) != shamir.SHARE_BYTES or sealed_pk != pks.get(v):
                raise TamperingDetected(
                    f"the mask key relayed for node {v} is not the one node {v} shared (round {sent_round})",
                    "the mask request was altered in transit; abort the run",
                )
            shares[v] = share
        st["incoming"] = {
            "round": round_,
            "active": _ids_json(cts),
            "s_pks": {str(v): b64(pk) for v, pk in pks.items()},
            "shares": {str(v): b64(s) for v, s in shares.items()},
        }
        self._save()

    def _check_round_number(self, round_: object) -> int:
        st = self._st()
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
            raise self._refuse(f"round {round_!r} is not an int >= 1")
        last = st["last_masked_round"]
        if last is not None and round_ <= last:
            raise self._refuse(
                f"it already masked round {last}; round {round_} would replay or rewind the run",
                "a node masks each round once and rounds only increase",
            )
        return round_

    # ---- per round: masked input -----------------------------------------------------------

    def mask(self, round_: int, vector: np.ndarray) -> dict[str, Any]:
        """Mask this round's encoded input (uint64) and return the masked reply.

        Returns {"masked": uint64 array, "b_shares": {recipient: ciphertext},
        "next_s_pk": bytes, "next_s_shares": {recipient: ciphertext}}: the input plus a fresh
        self mask PRG(b) plus the pairwise masks; b and the next round's mask key Shamir-split
        among this round's active nodes, each share encrypted to its holder.
        """
        st = self._st()
        me = st["node_id"]
        r = self._check_round_number(round_)
        incoming = st["incoming"]
        if incoming is None:
            raise self._refuse(
                f"it has no mask keys for round {r}", "deliver the mask request's keys with receive_keys() first"
            )
        if incoming["round"] is not None and incoming["round"] != r:
            raise self._refuse(f"its mask keys are for round {incoming['round']}, not round {r}")
        x = np.asarray(vector)
        if x.dtype != np.uint64 or x.ndim != 1:
            raise SecAggError("secagg mask expects a 1-D uint64 vector (use Quantizer.encode)")
        active = [int(v) for v in incoming["active"]]
        s_pks = {int(v): unb64(pk) for v, pk in incoming["s_pks"].items()}
        t = st["threshold"]

        y = x.copy()
        b = os.urandom(SEED_BYTES)
        masking.add_masks(y, [(b, +1), *masking.pairwise_masks(st["run_id"], r, me, unb64(st["s_sk"]), s_pks)])

        b_shares = shamir.split(b, t, active)
        next_sk, next_pk = keys.generate_keypair()
        s_shares = shamir.split(next_sk, t, active)
        b_cts = {v: self._seal_to(v, b_shares[v], r, STAGE_B_SHARE) for v in active}
        s_cts = {v: self._seal_to(v, s_shares[v] + next_pk, r, STAGE_S_SHARE) for v in active}
        del b, b_shares, s_shares

        for old in st["rounds"].values():  # earlier rounds can no longer be unmasked
            if old["status"] == "masked":
                old["status"] = "closed"
                old["shares"] = {}
        st["rounds"][str(r)] = {"active": active, "shares": incoming["shares"], "status": "masked"}
        st["s_sk"], st["s_pk"] = b64(next_sk), b64(next_pk)
        st["incoming"] = None
        st["last_masked_round"] = r
        self._save()
        return {"masked": y, "b_shares": b_cts, "next_s_pk": next_pk, "next_s_shares": s_cts}

    # ---- per round: unmask -------------------------------------------------------------------

    def unmask(
        self,
        round_: int,
        survivors: Sequence[Any],
        dropped: Sequence[Any],
        b_share_ciphertexts_for_me: Mapping[Any, bytes],
    ) -> dict[str, dict[int, bytes]]:
        """Reveal b-shares of survivors and mask-key shares of dropped nodes for one round.

        Returns {"b": {survivor_id: share}, "s": {dropped_id: share}}. Refuses (SecAggError)
        whenever revealing would let the server strip both masks of one node's input.
        """
        st = self._st()
        me = st["node_id"]
        surv = node_ids(survivors, "survivors")
        drop = node_ids(dropped, "dropped")
        both = sorted(set(surv) & set(drop))
        if both:
            raise self._refuse(
                f"nodes {both} are listed both as survivors and as dropped in round {round_}; revealing "
                "their self-mask and mask-key shares together would expose their input"
            )
        rejoined = sorted(set(surv) & set(st["revealed_s_for"]))
        if rejoined:
            raise self._refuse(
                f"nodes {rejoined} were declared dropped earlier (this node revealed their mask-key shares); "
                "they stay out for the rest of the run"
            )
        rec = st["rounds"].get(str(round_))
        if rec is None:
            raise self._refuse(f"it did not mask round {round_}, so it has nothing to unmask")
        if rec["status"] == "closed":
            raise self._refuse(f"round {round_} is closed (a later round was masked)")
        if me not in surv:
            raise self._refuse(f"it is not listed as a survivor of round {round_}")
        if set(surv) | set(drop) != set(rec["active"]):
            raise self._refuse(
                f"survivors + dropped {sorted(set(surv) | set(drop))} are not "
                f"round {round_}'s active nodes {rec['active']}"
            )
        if len(surv) < st["threshold"]:
            raise TooFewSurvivors(
                f"node {me} refuses to unmask round {round_}: {len(surv)} survivors listed, "
                f"threshold is {st['threshold']}",
                "a round needs at least the threshold of masked inputs",
            )
        if rec["status"] == "unmasked" and (rec["survivors"] != surv or rec["dropped"] != drop):
            raise self._refuse(
                f"round {round_} was already unmasked with survivors {rec['survivors']} and dropped {rec['dropped']}"
            )
        cts = by_node(b_share_ciphertexts_for_me, "b-share ciphertexts")
        missing, extra = sorted(set(surv) - set(cts)), sorted(set(cts) - set(surv))
        if missing or extra:
            raise self._refuse(
                f"b-share ciphertexts must come from exactly the survivors (missing {missing}, not survivors {extra})"
            )
        b_out = {v: self._open_from(v, cts[v], round_, STAGE_B_SHARE) for v in surv}
        if rec["status"] == "unmasked":
            s_out = {d: unb64(rec["revealed_s"][str(d)]) for d in drop}
            return {"b": b_out, "s": s_out}
        s_out = {}
        for d in drop:
            share = rec["shares"].get(str(d))
            if share is None:
                raise self._refuse(f"it holds no mask-key share of node {d} for round {round_}")
            s_out[d] = unb64(share)
        rec.update(
            status="unmasked",
            survivors=surv,
            dropped=drop,
            revealed_s={str(d): b64(s) for d, s in s_out.items()},
            shares={},
        )
        st["revealed_s_for"] = _ids_json(set(st["revealed_s_for"]) | set(drop))
        self._save()
        return {"b": b_out, "s": s_out}
