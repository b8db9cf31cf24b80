"""The node (hospital) half of secure aggregation, secure against a coordinator that deviates.

One ``SecAggNode`` is one hospital in one run. Every step loads the state file, checks that the
step is allowed, does its work and writes the state back atomically before returning, so each step
works in a fresh process and a crash never leaves the node half-way through a reveal.

What a node checks, and why (Bonawitz et al., CCS 2017, actively secure variant, with SecAgg+'s
neighbourhoods from Bell et al., CCS 2020):

- **Identities.** Every advertisement is signed with the sender's identity key and checked against
  this hospital's pinned consortium roster (``identity.py``): the coordinator cannot add a node,
  impersonate one or substitute a key. Two nodes claiming one member are refused.
- **Node-owned minimums.** The federation (verified members only) must be at least the hospital's
  minimum, and the threshold a strict majority of every neighbourhood and at least its floor.
- **One view of the federation.** Each advertisement signs the node list the coordinator claimed,
  each setup statement the participant set; a node refuses peers whose view differs. The graph of
  neighbourhoods is derived from all advertised keys, so every honest node computes the same one.
- **Masking keys are the owners'.** A round's mask keys arrive with their owners' signed statements,
  which also commit to every share the owner dealt (its hash per holder): a holder checks its share
  against the commitment before it keeps or reveals it, so an honest holder cannot be framed, and a
  holder that reveals a share it was not dealt is caught and named.
- **Never both masks.** A round is unmasked in one of two ways, and a node answers only one of them,
  once: the *fast* path (nobody dropped) reveals self-mask shares only; the *consistency* path
  first has the node sign one view of who survived, then reveals self-mask shares of survivors and
  mask-key shares of dropped neighbours only if, for every neighbour, at least t members of that
  neighbour's neighbourhood signed the very same view. Honest nodes sign one view a round, and t is a
  strict majority of every neighbourhood, so no two honest holders of one node's shares can act on
  different views: the coordinator never obtains both a node's self mask and the keys that remove
  its pairwise masks (it learns at most sums of at least t - c honest inputs with c colluders).

Mask keys rotate every round (announced in the previous round, shared with its neighbours), so a
revealed key uncovers one round only. A node deletes its private mask key once it has masked with
it, and the shares it holds for a round once that round is unmasked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secure_aggregation import commitments, graph, keys, masking, node_state, shamir
from secure_aggregation.errors import SecAggError, TamperingDetected, TooFewSurvivors
from secure_aggregation.identity import Consortium, canonical, digest
from secure_aggregation.node_state import b64, unb64
from secure_aggregation.prg import SEED_BYTES
from secure_aggregation.validation import by_node, node_id, node_ids

SETUP_ROUND = 0
STAGE_S_SHARE = "s-share"
STAGE_B_SHARE = "b-share"
SIG_BYTES = 64
AD_BYTES = ("identity", "nodes", "c_pk", "s_pk", "sig")  # advertisement fields that are bytes


def share_hash(run_id: keys.RunId, round_: int, stage: str, dealer: int, holder: int, share: bytes) -> bytes:
    """A dealer's commitment to one share (what the server checks a revealed share against): SHA-256
    over a length-prefixed binary encoding (many per round: no JSON)."""
    h = hashlib.sha256(b"fedcare-secagg/v2/share")
    for part in (str(run_id).encode(), stage.encode(), bytes(share)):
        h.update(len(part).to_bytes(4, "big") + part)
    h.update(int(round_).to_bytes(8, "big") + int(dealer).to_bytes(16, "big") + int(holder).to_bytes(16, "big"))
    return h.digest()


def seed_hash(run_id: keys.RunId, round_: int, node: int, seed: bytes) -> bytes:
    """The commitment to a node's self-mask seed in its signed round statement."""
    return hashlib.sha256(canonical("self-mask", run_id, round_, node, seed)).digest()


def read_advertisement(raw: Mapping[str, Any]) -> dict[str, Any]:
    """An advertisement as received, its fields typed (raises KeyError, TypeError or ValueError when
    one is missing or malformed: the caller says whose it was and what that means)."""
    return {
        "name": str(raw["name"]),
        "identity": bytes(raw["identity"]),
        "t": int(raw["t"]),
        "k": int(raw["k"]),
        "nodes": bytes(raw["nodes"]),
        "c_pk": keys.check_key_bytes(raw["c_pk"], "c_pk"),
        "s_pk": keys.check_key_bytes(raw["s_pk"], "s_pk"),
        "sig": bytes(raw["sig"]),
    }


def advertisement_message(run_id: keys.RunId, node: int, ad: Mapping[str, Any]) -> bytes:
    return canonical(
        "advertise",
        run_id,
        node,
        ad["name"],
        bytes(ad["identity"]),
        int(ad["t"]),
        int(ad["k"]),
        bytes(ad["nodes"]),
        bytes(ad["c_pk"]),
        bytes(ad["s_pk"]),
    )


def setup_message(run_id: keys.RunId, node: int, participants: bytes, s_pk: bytes, s_commits: bytes) -> bytes:
    return canonical("setup", run_id, node, participants, s_pk, s_commits)


def round_message(run_id: keys.RunId, round_: int, node: int, statement: Mapping[str, Any]) -> bytes:
    """A round statement: the set a node masked with, commitments to its self-mask seed and to every
    share it dealt (of that seed, and of its next mask key), and that next mask key."""
    return canonical(
        "round",
        run_id,
        round_,
        node,
        bytes(statement["participants"]),
        sorted(int(v) for v in statement["active"]),
        bytes(statement["b_hash"]),
        bytes(statement["next_s_pk"]),
        commitments.digest(statement["b_commits"]),
        commitments.digest(statement["s_commits"]),
    )


def view_message(run_id: keys.RunId, round_: int, view: Sequence[int]) -> bytes:
    return canonical("view", run_id, round_, sorted(int(v) for v in view))


def graph_seed(run_id: keys.RunId, ads: Mapping[int, Mapping[str, Any]]) -> bytes:
    """The public seed of the neighbourhood graph: every advertised key (no party chooses it)."""
    return digest(
        "graph",
        run_id,
        [[nid, ads[nid]["name"], bytes(ads[nid]["c_pk"]), bytes(ads[nid]["s_pk"])] for nid in sorted(ads)],
    )


def participants_digest(run_id: keys.RunId, ids: Sequence[int]) -> bytes:
    return digest("participants", run_id, sorted(int(v) for v in ids))


def closed_neighbourhoods(run_id: keys.RunId, ads: Mapping[int, Mapping[str, Any]], k: int) -> dict[int, list[int]]:
    """N[u] (u and its k graph neighbours; everyone when k >= n - 1) for every participant."""
    ids = sorted(ads)
    open_ = graph.neighbours(graph_seed(run_id, ads), ids, min(k, len(ids) - 1))
    return {u: sorted({u, *open_[u]}) for u in ids}


def check_graph_parameters(t: object, k: object, floor: int = 2) -> tuple[int, int]:
    """t must be a strict majority of every closed neighbourhood (k + 1 holders) and at least ``floor``."""
    if isinstance(t, bool) or not isinstance(t, int) or isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SecAggError(f"secagg threshold {t!r} / neighbours {k!r} must be ints (k >= 1)")
    if not (max(2, floor) <= t <= k + 1 and 2 * t > k + 1):
        raise SecAggError(
            f"secagg threshold {t} is invalid for neighbourhoods of {k + 1}",
            f"use a strict majority of every neighbourhood, at least {max(2, floor)}",
        )
    return t, k


class SecAggNode:
    """One node's side of secure aggregation for one run; state lives in ``state_path``.

    Keep ``state_path`` in the hospital's private state directory, one file per run: it holds the
    node's private keys. ``consortium`` is who this hospital accepts as peers (its pinned roster).
    """

    def __init__(self, state_path: str | os.PathLike[str], consortium: Consortium | None = None) -> None:
        self.path = Path(state_path)
        self.consortium = consortium
        self._state: dict[str, Any] | None = node_state.load(self.path)
        self._enc_keys: dict[int, bytes] = {}

    # ---- small helpers -------------------------------------------------------------------------
    @property
    def node_id(self) -> int:
        return int(self._st()["node_id"])

    @property
    def run_id(self) -> keys.RunId:
        return self._st()["run_id"]

    @property
    def participants(self) -> list[int]:
        """The verified members of this run (after share_keys)."""
        return [int(v) for v in self._st()["participants"]]

    @property
    def revealed_mask_keys_of(self) -> list[int]:
        return sorted(int(v) for v in self._st()["revealed_s_for"])

    def _st(self) -> dict[str, Any]:
        if self._state is None:
            raise SecAggError(f"no secure-aggregation state at {self.path}", "call advertise() first")
        return self._state

    def _save(self) -> None:
        node_state.save(self.path, self._st())

    def _refuse(self, reason: str, hint: str = "") -> SecAggError:
        st = self._st()
        return SecAggError(f"{st['name']} (node {st['node_id']}, run {st['run_id']}) refuses: {reason}", hint)

    def _members(self) -> Consortium:
        if self.consortium is None:
            raise SecAggError("this node has no consortium roster", "set roster and identity-key in hospital.toml")
        return self.consortium

    def _sign(self, message: bytes) -> bytes:
        return self._members().sign(self._st()["name"], message)

    def _ad(self, nid: int) -> dict[str, Any]:
        raw = self._st()["ads"][str(nid)]
        return {**raw, **{f: unb64(raw[f]) for f in AD_BYTES}}

    def _enc_key(self, peer: int) -> bytes:
        """The AES-GCM key of the share channel with ``peer``: derived once, kept with the state (which
        holds the private key it comes from anyway), so no message repeats the key agreement."""
        if peer not in self._enc_keys:
            st = self._st()
            cached = (st.get("channel_keys") or {}).get(str(peer))
            if cached is not None:
                self._enc_keys[peer] = unb64(cached)
            else:
                shared = keys.agree(unb64(st["c_sk"]), self._ad(peer)["c_pk"], peer=peer)
                self._enc_keys[peer] = keys.encryption_key(shared, st["run_id"], st["node_id"], peer)
                if st.get("ads") is not None:
                    st.setdefault("channel_keys", {})[str(peer)] = b64(self._enc_keys[peer])
        return self._enc_keys[peer]

    def _deal(
        self, secret: bytes, holders: Sequence[int], round_: int, stage: str, extra: bytes = b""
    ) -> tuple[dict[int, bytes], bytes]:
        """Shamir-split ``secret`` among ``holders``: (sealed shares, packed commitments: a share hash per
        holder, ``commitments.pack``).

        Each share is sealed to its holder (with ``extra``, e.g. the public key it belongs to); the
        commitments go into the dealer's signed statement, so a holder checks its share before it ever
        reveals it, and the server can tell a share a holder changed from one the dealer dealt."""
        st = self._st()
        me, run = st["node_id"], st["run_id"]
        shares = shamir.split(secret, st["t"], holders)
        sealed, commits = {}, {}
        for h in holders:
            commits[h] = share_hash(run, round_, stage, me, h, shares[h])
            sealed[h] = keys.seal(self._enc_key(h), shares[h] + extra, keys.aad(run, round_, stage, me, h))
        return sealed, commitments.pack(commits)

    def _open_share(self, dealer: int, blob: object, round_: int, stage: str, commit: object) -> tuple[bytes, bytes]:
        """(share, extra) from a sealed share that matches its dealer's signed commitment; TamperingDetected
        names the dealer."""
        st = self._st()
        if not isinstance(blob, (bytes, bytearray)):
            raise TamperingDetected(f"{stage} from node {dealer} is not bytes")
        plain = keys.open_share(self._enc_key(dealer), bytes(blob), st["run_id"], round_, stage, dealer, st["node_id"])
        share = plain[: shamir.SHARE_BYTES]
        if share_hash(st["run_id"], round_, stage, dealer, st["node_id"], share) != commit:
            raise TamperingDetected(f"the {stage} node {dealer} sealed to this node is not the one it committed to")
        return share, plain[shamir.SHARE_BYTES :]

    def _verified_statement(self, node: int, round_: int, entry: Mapping[str, Any], s_pk: bytes) -> dict[str, Any]:
        """``node``'s statement of ``round_`` (its setup statement for round 0), signature checked once.

        A statement verified when its round was unmasked is remembered (by digest), so the next round's
        mask request, which carries it again, does not pay the signature check twice."""
        st = self._st()
        run = st["run_id"]
        try:
            s_commits = commitments.checked(entry.get("s_commits"), f"the share commitments of node {node}")
            b_commits = (
                b""
                if round_ == SETUP_ROUND
                else commitments.checked(entry.get("b_commits"), f"the seed commitments of node {node}")
            )
        except SecAggError as exc:
            raise TamperingDetected(exc.problem, "the request was altered: nothing is revealed") from None
        if round_ == SETUP_ROUND:
            message = setup_message(run, node, unb64(st["participants_digest"]), s_pk, commitments.digest(s_commits))
            statement = {"active": None, "s_commits": s_commits}
        else:
            statement = {
                "participants": unb64(st["participants_digest"]),
                "active": entry.get("active", []),
                "b_hash": entry.get("b_hash", b""),
                "next_s_pk": s_pk,
                "b_commits": b_commits,
                "s_commits": s_commits,
            }
            message = round_message(run, round_, node, statement)
        known = st.setdefault("verified", {})
        seen = hashlib.sha256(message).hexdigest()
        if known.get(str(node)) != seen:
            try:
                self._members().check(
                    self._ad(node)["name"], entry.get("sig"), message, f"the round-{round_} statement of node {node}"
                )
            except SecAggError as exc:
                raise TamperingDetected(exc.problem, "the request was altered: nothing is revealed") from None
            known[str(node)] = seen
        return statement

    def _neighbourhood(self, nid: int) -> list[int]:
        return [int(v) for v in self._st()["graph"][str(nid)]]

    # ---- setup 1: advertise signed keys ------------------------------------------------------------
    def _advertised_again(self, st: dict[str, Any], setup: tuple[Any, ...], view: bytes) -> dict[str, Any]:
        """The advertisement this state already holds, if ``setup`` (run, node, name, t, k) and ``view`` match."""
        if (st["run_id"], st["node_id"], st["name"], st["t"], st["k"]) != setup or unb64(st["my_ad"]["nodes"]) != view:
            raise SecAggError(
                f"{self.path} holds another advertisement for run {st['run_id']}",
                "a run's setup happens once; a new run uses a new state file",
            )
        return {**st["my_ad"], **{f: unb64(st["my_ad"][f]) for f in AD_BYTES}}

    def advertise(
        self,
        run_id: keys.RunId,
        me: int,
        name: str,
        threshold: int,
        neighbours: int,
        claimed_nodes: Sequence[int],
        floor: int = 2,
    ) -> dict[str, Any]:
        """This run's key pairs, advertised and signed: {"name", "t", "k", "nodes", "c_pk", "s_pk", "sig"}.

        ``claimed_nodes``: the node list the coordinator says the run has (signed as this node's view).
        Calling it again for the same run returns the same advertisement (message re-delivery).
        """
        me = node_id(me)
        t, k = check_graph_parameters(threshold, neighbours, floor)
        claimed = node_ids(claimed_nodes, "the run's node list")
        if me not in claimed:
            raise SecAggError(f"node {me} is not among the run's nodes")
        view = participants_digest(run_id, claimed)
        if self._state is not None:
            return self._advertised_again(self._state, (run_id, me, name, t, k), view)
        c_sk, c_pk = keys.generate_keypair()
        s_sk, s_pk = keys.generate_keypair()
        identity = self._members().public_key(name)
        if identity is None:
            raise SecAggError(
                f"{name!r} is not on this hospital's own consortium roster",
                "the roster must list this hospital under the name its data reports",
            )
        ad = {"name": name, "identity": identity, "t": t, "k": k, "nodes": view, "c_pk": c_pk, "s_pk": s_pk}
        self._state = {
            "run_id": run_id,
            "node_id": me,
            "name": name,
            "t": t,
            "k": k,
            "c_sk": b64(c_sk),
            "s_sk": b64(s_sk),
            "s_pk": b64(s_pk),
            "ads": None,
            "graph": None,
            "setup": None,
            "incoming": None,
            "last_masked_round": None,
            "rounds": {},
            "revealed_s_for": [],
        }
        ad["sig"] = self._sign(advertisement_message(run_id, me, ad))
        self._state["my_ad"] = {f: (b64(v) if isinstance(v, bytes) else v) for f, v in ad.items()}
        self._save()
        return ad

    # ---- setup 2: check every advertisement, deal shares of the first mask key ----------------------
    def share_keys(self, ads: Mapping[Any, Mapping[str, Any]], min_nodes: int = 2) -> dict[str, Any]:
        """Verify the advertisements and deal this node's first mask key among its neighbourhood.

        Returns {"shares": {holder: ciphertext}, "participants": digest, "sig"} (the signed setup
        statement binds the participant set and this node's first mask key). Refuses a federation of
        fewer than ``min_nodes`` verified members (the hospital's own minimum).
        """
        st = self._st()
        me, run = st["node_id"], st["run_id"]
        verified = self._check_ads(ads)
        if len(verified) < max(min_nodes, st["t"]):
            raise self._refuse(
                f"only {len(verified)} verified members advertised keys; it joins federations "
                f"of at least {max(min_nodes, st['t'])}"
            )
        participants = participants_digest(run, sorted(verified))
        if st["setup"] is not None:
            if unb64(st["setup"]["participants"]) != participants:
                raise self._refuse("setup was already done with a different set of participants")
            return {
                "shares": {int(h): unb64(c) for h, c in st["setup"]["shares"].items()},
                "s_commits": unb64(st["setup"]["s_commits"]),
                "participants": participants,
                "sig": unb64(st["setup"]["sig"]),
            }
        # Kept: the participants, and the keys and neighbourhoods of the nodes within two hops, the only
        # ones this node ever masks with, holds shares of, or counts signatures from (O(k), not O(n)).
        hoods = closed_neighbourhoods(run, verified, st["k"])
        near = sorted({z for w in hoods[me] for z in hoods[w]})
        st["participants"] = sorted(verified)
        st["participants_digest"] = b64(participants)
        st["ads"] = {str(n): {**verified[n], **{f: b64(verified[n][f]) for f in AD_BYTES}} for n in near}
        st["graph"] = {str(n): hoods[n] for n in near}
        holders = self._neighbourhood(me)
        if len(holders) < st["t"]:
            raise self._refuse(f"its neighbourhood has {len(holders)} members, below the threshold {st['t']}")
        s_pk = unb64(st["s_pk"])
        shares, commits = self._deal(unb64(st["s_sk"]), holders, SETUP_ROUND, STAGE_S_SHARE, extra=s_pk)
        sig = self._sign(setup_message(run, me, participants, s_pk, commitments.digest(commits)))
        st["setup"] = {
            "participants": b64(participants),
            "sig": b64(sig),
            "shares": {str(h): b64(c) for h, c in shares.items()},
            "s_commits": b64(commits),
        }
        self._save()
        return {"shares": shares, "s_commits": commits, "participants": participants, "sig": sig}

    def _check_ads(self, ads: Mapping[Any, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        st = self._st()
        me, run = st["node_id"], st["run_id"]
        members = self._members()
        verified: dict[int, dict[str, Any]] = {}
        names: dict[str, int] = {}
        for nid, raw in by_node(ads, "advertisements").items():
            try:
                ad = read_advertisement(raw)
            except (KeyError, TypeError, ValueError) as exc:
                raise TamperingDetected(f"the advertisement of node {nid} is malformed ({exc})") from None
            if members.public_key(ad["name"]) != ad["identity"]:
                raise TamperingDetected(
                    f"node {nid} advertises an identity key that is not {ad['name']!r}'s on this hospital's roster",
                    "the coordinator relayed a forged key: abort the run",
                )
            try:
                members.check(ad["name"], ad["sig"], advertisement_message(run, nid, ad), f"the keys of node {nid}")
            except SecAggError as exc:
                raise TamperingDetected(
                    exc.problem, "the coordinator relayed a key no member signed: abort the run"
                ) from exc
            if ad["name"] in names:
                raise TamperingDetected(f"nodes {names[ad['name']]} and {nid} both claim to be {ad['name']!r}")
            names[ad["name"]] = nid
            verified[nid] = ad
        mine = verified.get(me)
        own = st["my_ad"]
        if mine is None or b64(mine["c_pk"]) != own["c_pk"] or b64(mine["s_pk"]) != own["s_pk"]:
            raise TamperingDetected(f"the advertisements do not hold node {me}'s own keys unchanged")
        for nid, ad in verified.items():
            if (ad["t"], ad["k"], b64(ad["nodes"])) != (st["t"], st["k"], own["nodes"]):
                raise TamperingDetected(
                    f"node {nid} was told a different federation (node list, threshold or "
                    "neighbourhood size) than this node: the coordinator split the views"
                )
        all_keys = [ad[f] for ad in verified.values() for f in ("c_pk", "s_pk")]
        if len(set(all_keys)) != len(all_keys):
            raise TamperingDetected("two advertisements share a key")
        return verified

    # ---- receiving a round's mask keys -------------------------------------------------------------
    def receive_keys(self, round_: int, peers: Mapping[Any, Mapping[str, Any]]) -> None:
        """Take round ``round_``'s mask keys: for each neighbour masking this round, its public mask key,
        the signed statement that announced it, and this node's sealed share of the private key.

        ``peers[v]`` = {"s_pk", "ct", "sig", "s_commits"} plus, after round 1, the rest of v's statement
        of round - 1 ("active", "b_hash", "b_commits"). Raises naming the peer whose key or share fails.
        """
        st = self._st()
        me = st["node_id"]
        r = self._check_round_number(round_)
        if st["ads"] is None:
            raise self._refuse("mask keys arrived before the setup", "run share_keys first")
        given = by_node(peers, "mask keys")
        if me not in given:
            raise self._refuse("the mask keys do not include this node's own")
        outsiders = sorted(set(given) - set(self._neighbourhood(me)))
        if outsiders:
            raise self._refuse(f"mask keys of nodes {outsiders}, which are not its neighbours")
        banned = sorted(set(given) & set(st["revealed_s_for"]))
        if banned:
            raise self._refuse(f"nodes {banned} were declared dropped earlier (their mask keys are public)")
        prev = st["last_masked_round"]
        if prev is not None:
            allowed = set(st["rounds"][str(prev)]["active"])
            if set(given) - allowed:
                raise self._refuse(
                    f"mask keys from nodes {sorted(set(given) - allowed)} that did not mask with it in round {prev}"
                )
        if len(given) < st["t"]:
            raise TooFewSurvivors(
                f"only {len(given)} of its neighbours hold mask keys for round {r}; the threshold is {st['t']}",
                "the run cannot continue with this node",
            )
        sent_round = SETUP_ROUND if prev is None else prev
        incoming_keys, incoming_shares = {}, {}
        for v, entry in sorted(given.items()):
            s_pk = keys.check_key_bytes(entry.get("s_pk"), f"mask key of node {v}")
            statement = self._verified_statement(v, sent_round, entry, s_pk)
            if statement["active"] is not None and me not in {int(a) for a in statement["active"]}:
                raise TamperingDetected(f"node {v} did not mask with this node in round {prev}")
            share, sealed_pk = self._open_share(
                v, entry.get("ct"), sent_round, STAGE_S_SHARE, commitments.lookup(statement["s_commits"], me)
            )
            if sealed_pk != s_pk:
                raise TamperingDetected(f"the mask key relayed for node {v} is not the one node {v} shared")
            incoming_keys[str(v)], incoming_shares[str(v)] = b64(s_pk), b64(share)
        if incoming_keys[str(me)] != st["s_pk"]:
            raise TamperingDetected(f"the mask key listed for node {me} is not its own")
        st["incoming"] = {"round": r, "s_pks": incoming_keys, "shares": incoming_shares}
        self._save()

    def _check_round_number(self, round_: object) -> int:
        st = self._st()
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
            raise self._refuse(f"round {round_!r} is not an int >= 1")
        last = st["last_masked_round"]
        if last is not None and round_ <= last:
            raise self._refuse(f"it already masked round {last}; round {round_} would replay or rewind the run")
        return round_

    # ---- per round: the masked input ---------------------------------------------------------------
    def mask(self, round_: int, vector: np.ndarray, in_place: bool = False) -> dict[str, Any]:
        """Mask this round's encoded input (uint64) with the neighbours whose keys it received;
        ``in_place``: the caller hands ``vector`` over and it is masked where it lies (no copy).

        Returns {"masked", "b_shares": {holder: ct}, "next_s_pk", "next_s_shares": {holder: ct},
        "active", "b_hash", "b_commits", "s_commits", "sig"}: with "next_s_pk", the signed round
        statement (the set it masked with, commitments to its self-mask seed and to every share it
        dealt, and its next mask key).
        """
        st = self._st()
        me, run = st["node_id"], st["run_id"]
        r = self._check_round_number(round_)
        incoming = st["incoming"]
        if incoming is None or incoming["round"] != r:
            raise self._refuse(f"it has no mask keys for round {r}", "deliver them with receive_keys() first")
        x = np.asarray(vector)
        if x.dtype != np.uint64 or x.ndim != 1:
            raise SecAggError("secagg mask expects a 1-D uint64 vector (use Quantizer.encode)")
        active = sorted(int(v) for v in incoming["s_pks"])
        s_pks = {int(v): unb64(pk) for v, pk in incoming["s_pks"].items()}
        y = x if in_place and x.flags.c_contiguous and x.flags.writeable else x.copy()
        b = os.urandom(SEED_BYTES)
        masking.add_masks(y, [(b, +1), *masking.pairwise_masks(run, r, me, unb64(st["s_sk"]), s_pks)])
        next_sk, next_pk = keys.generate_keypair()
        b_cts, b_commits = self._deal(b, active, r, STAGE_B_SHARE)
        s_cts, s_commits = self._deal(next_sk, active, r, STAGE_S_SHARE, extra=next_pk)
        statement = {
            "participants": unb64(st["participants_digest"]),
            "active": active,
            "b_hash": seed_hash(run, r, me, b),
            "next_s_pk": next_pk,
            "b_commits": b_commits,
            "s_commits": s_commits,
        }
        sig = self._sign(round_message(run, r, me, statement))
        del b
        for old in st["rounds"].values():  # earlier rounds can no longer be unmasked
            if old["status"] in ("masked", "signed"):
                old["status"], old["shares"] = "closed", {}
        st["rounds"][str(r)] = {"active": active, "shares": incoming["shares"], "status": "masked"}
        st["s_sk"], st["s_pk"] = b64(next_sk), b64(next_pk)
        st["incoming"] = None
        st["last_masked_round"] = r
        self._save()
        return {
            "masked": y,
            "b_shares": b_cts,
            "next_s_pk": next_pk,
            "next_s_shares": s_cts,
            "active": active,
            "b_hash": statement["b_hash"],
            "b_commits": b_commits,
            "s_commits": s_commits,
            "sig": sig,
        }

    def masked_with(self, round_: int) -> list[int]:
        """The nodes whose pairwise masks this node added in ``round_`` (itself included)."""
        rec = self._st()["rounds"].get(str(round_))
        if rec is None:
            raise self._refuse(f"it did not mask round {round_}")
        return [int(v) for v in rec["active"]]

    # ---- per round: unmasking ----------------------------------------------------------------------
    def _round(self, round_: int) -> dict[str, Any]:
        rec = self._st()["rounds"].get(str(round_))
        if rec is None:
            raise self._refuse(f"it did not mask round {round_}, so it has nothing to unmask")
        if rec["status"] == "closed":
            raise self._refuse(f"round {round_} is closed (a later round was masked)")
        return rec

    def _open_b_shares(
        self, round_: int, owners: list[int], cts: Mapping[int, Any], statements: Mapping[Any, Any]
    ) -> tuple[dict, list[int]]:
        """This node's self-mask shares of ``owners``, each checked against its owner's signed round
        statement, and the owners whose share failed (a complaint: the share is withheld, never guessed)."""
        given = by_node(statements, "round statements")
        out: dict[int, bytes] = {}
        complaints = []
        for w in owners:
            try:
                entry = given.get(w) or {}
                statement = self._verified_statement(
                    w, round_, entry, keys.check_key_bytes(entry.get("next_s_pk"), f"next mask key of node {w}")
                )
                share, _ = self._open_share(
                    w, cts.get(w), round_, STAGE_B_SHARE, commitments.lookup(statement["b_commits"], self.node_id)
                )
            except SecAggError:
                complaints.append(w)
                continue
            out[w] = share
        return out, complaints

    def unmask_fast(
        self, round_: int, b_share_ciphertexts: Mapping[Any, Any], statements: Mapping[Any, Any]
    ) -> dict[str, Any]:
        """Nobody dropped: reveal self-mask shares of the nodes it masked with, and nothing else, for
        good: this round will never reveal a mask-key share. Returns {"b": {owner: share}, "complaints"}."""
        rec = self._round(round_)
        if rec["status"] == "signed" or rec["status"] == "unmasked":
            raise self._refuse(f"it already took round {round_}'s consistency path; it answers one path once")
        cts = by_node(b_share_ciphertexts, "self-mask share ciphertexts")
        strangers = sorted(set(cts) - set(rec["active"]))
        if strangers:
            raise self._refuse(f"self-mask shares of nodes {strangers} it did not mask with in round {round_}")
        owners = sorted(cts)
        if rec["status"] == "fast" and owners != rec["owners"]:
            raise self._refuse(f"round {round_} was already unmasked for nodes {rec['owners']}")
        b, complaints = self._open_b_shares(round_, owners, cts, statements)
        if rec["status"] != "fast":
            rec.update(status="fast", owners=owners, shares={})
        self._save()  # the verified statements, for the next round's keys
        return {"b": b, "complaints": complaints}

    def sign_view(self, round_: int, survivors: Sequence[Any]) -> bytes:
        """Someone dropped: sign the one view of round ``round_``'s survivors this node will act on."""
        st = self._st()
        me = st["node_id"]
        rec = self._round(round_)
        view = node_ids(survivors, "survivors")
        if rec["status"] == "fast":
            raise self._refuse(f"it already revealed round {round_}'s self-mask shares on the fast path")
        if rec["status"] in ("signed", "unmasked"):
            if rec["view"] != view:
                raise self._refuse(f"it already signed another view of round {round_}'s survivors")
            return unb64(rec["view_sig"])
        if me not in view:
            raise self._refuse(f"it is not listed as a survivor of round {round_}")
        members = set(self.participants)
        if set(view) - members:
            raise self._refuse(
                f"the survivors include nodes {sorted(set(view) - members)} that are not members of this run"
            )
        alive = set(view) & set(rec["active"])
        if len(alive) < st["t"]:
            raise TooFewSurvivors(
                f"{st['name']} refuses to unmask round {round_}: {len(alive)} of the nodes it "
                f"masked with survived, the threshold is {st['t']}"
            )
        sig = self._sign(view_message(st["run_id"], round_, view))
        rec.update(status="signed", view=view, view_sig=b64(sig))
        self._save()
        return sig

    def unmask(
        self,
        round_: int,
        survivors: Sequence[Any],
        signatures: Mapping[Any, Any],
        b_share_ciphertexts: Mapping[Any, Any],
        statements: Mapping[Any, Any],
    ) -> dict[str, Any]:
        """The consistency path: reveal self-mask shares of surviving neighbours and mask-key shares of
        dropped ones, once at least t members of every neighbour's neighbourhood signed the same view.

        Returns {"b": {survivor: share}, "s": {dropped: share}, "complaints": [owners]}.
        """
        st = self._st()
        rec = self._round(round_)
        view = node_ids(survivors, "survivors")
        if rec["status"] not in ("signed", "unmasked") or rec.get("view") != view:
            raise self._refuse(f"it signed no view, or another one, of round {round_}'s survivors")
        signed = self._verified_signers(round_, view, signatures)
        for w in rec["active"]:
            hood = set(self._neighbourhood(w))
            if len(hood & signed) < st["t"]:
                raise self._refuse(
                    f"only {len(hood & signed)} members of node {w}'s neighbourhood signed this view of round "
                    f"{round_}; {st['t']} are needed before any share is revealed",
                    "the coordinator must gather the view signatures of the survivors",
                )
        cts = by_node(b_share_ciphertexts, "self-mask share ciphertexts")
        alive = sorted(set(rec["active"]) & set(view))
        dropped = sorted(set(rec["active"]) - set(view))
        missing = sorted(set(alive) - set(cts))
        b, complaints = self._open_b_shares(round_, [w for w in alive if w in cts], cts, statements)
        complaints += missing
        if rec["status"] == "unmasked":
            s = {int(d): unb64(v) for d, v in rec["revealed_s"].items()}
        else:
            s = {d: unb64(rec["shares"][str(d)]) for d in dropped}
            rec.update(status="unmasked", revealed_s={str(d): b64(v) for d, v in s.items()}, shares={})
            st["revealed_s_for"] = sorted(set(st["revealed_s_for"]) | set(dropped))
        self._save()
        return {"b": b, "s": s, "complaints": sorted(complaints)}

    def _verified_signers(self, round_: int, view: list[int], signatures: Mapping[Any, Any]) -> set[int]:
        st = self._st()
        message = view_message(st["run_id"], round_, view)
        signed = {st["node_id"]}  # its own, which it checked by signing exactly this view
        for z, sig in by_node(signatures, "view signatures").items():
            if z not in view or str(z) not in st["ads"]:
                continue
            try:
                self._members().check(self._ad(z)["name"], sig, message, f"the view signature of node {z}")
            except SecAggError:
                continue  # not counted: the coordinator cannot pass off a bad signature as support
            signed.add(z)
        return signed
