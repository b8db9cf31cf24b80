"""The server (coordinator) half of secure aggregation: routing, a running masked sum, robust unmasking.

The server relays signed advertisements, statements and sealed shares it cannot read, adds masked
inputs into one running modular sum, and at the end of a round removes the masks with the shares
the nodes reveal: each survivor's self mask (from >= t shares) and, for a node that dropped after
the others masked with it, the pairwise masks it shared with them (from >= t shares of its round
mask key). No individual input is ever stored: a masked input is added to the sum and forgotten.

A round is unmasked on the fast path when every active node sent its input (self-mask shares only)
and otherwise on the consistency path (survivors sign one view; the signatures travel with the
unmask request). Robustness against one bad hospital: every dealer's signed statement commits to
the hash of each share it dealt, so a revealed share that is not the committed one is discarded
and its *sender* named; the round completes while every secret still has t good shares. A dealer
whose own committed shares do not rebuild its secret is named and the round fails with the model
unchanged.
Nodes that drop, or are named, stay out for the rest of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from secure_aggregation import commitments, keys, masking, shamir
from secure_aggregation.errors import SecAggError, ShamirError, TamperingDetected, TooFewSurvivors
from secure_aggregation.identity import verify
from secure_aggregation.node_half import (
    SETUP_ROUND,
    SIG_BYTES,
    STAGE_B_SHARE,
    STAGE_S_SHARE,
    advertisement_message,
    check_graph_parameters,
    closed_neighbourhoods,
    participants_digest,
    read_advertisement,
    seed_hash,
    share_hash,
)
from secure_aggregation.prg import SEED_BYTES
from secure_aggregation.validation import by_node, ciphertext, node_id, node_ids


class _ModularSum:
    """Running sum modulo 2**64 of equal-length uint64 vectors; the addends are not kept."""

    __slots__ = ("_total", "count")

    def __init__(self, length: int) -> None:
        self._total = np.zeros(length, dtype=np.uint64)
        self.count = 0

    def add(self, vector: np.ndarray) -> None:
        np.add(self._total, vector, out=self._total)
        self.count += 1

    def take_total(self) -> np.ndarray:
        """The sum itself (no copy); this object is spent afterwards."""
        total, self._total = self._total, np.zeros(0, dtype=np.uint64)
        return total


@dataclass
class RoundOutcome:
    """What ``finish`` found: whose input was summed, who dropped, who misbehaved and how."""

    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    blamed: dict[int, str] = field(default_factory=dict)  # node -> what it did wrong (the sender)
    silent: list[int] = field(default_factory=list)  # survivors that did not answer the unmask


@dataclass
class _Round:
    number: int
    active: list[int]
    keys: dict[int, bytes]  # the mask key each active node masks with this round
    key_commits: dict[int, dict[int, bytes]]  # each key's share commitments (to check a revealed share)
    sum: _ModularSum
    peers: dict[int, list[int]] = field(default_factory=dict)  # what each node was asked to mask with
    contributors: list[int] = field(default_factory=list)
    statements: dict[int, dict[str, Any]] = field(default_factory=dict)
    b_cts: dict[int, dict[int, bytes]] = field(default_factory=dict)
    next_cts: dict[int, dict[int, bytes]] = field(default_factory=dict)
    b_commit_maps: dict[int, dict[int, bytes]] = field(default_factory=dict)  # statements' commitments, unpacked
    s_commit_maps: dict[int, dict[int, bytes]] = field(default_factory=dict)
    view: list[int] | None = None
    in_view: frozenset[int] = frozenset()  # the view as a set (membership tests at O(1))
    view_sigs: dict[int, bytes] = field(default_factory=dict)
    path: str | None = None  # "fast" or "consistency", once the unmask starts
    status: str = "open"
    keys_dealt_in: int = SETUP_ROUND  # the round whose dealing carried this round's mask-key shares


class SecAggServer:
    """Server half for one run. Not persisted: a server restart needs a new run (new setup)."""

    def __init__(
        self, run_id: keys.RunId, threshold: int, neighbours: int, node_ids_: Sequence[int], vector_length: int
    ) -> None:
        self.run_id = run_id
        self.node_ids = node_ids(node_ids_, "node_ids")
        self.threshold, self.neighbours = check_graph_parameters(threshold, neighbours)
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
            raise SecAggError(f"vector_length must be an int >= 1, got {vector_length!r}")
        self.vector_length = vector_length
        self._ads: dict[int, dict[str, Any]] = {}
        self._keys_closed = False
        self._setup: dict[int, dict[str, Any]] = {}
        self._setup_commits: dict[int, dict[int, bytes]] = {}  # setup statements' commitments, unpacked
        self.hoods: dict[int, list[int]] = {}
        self._round: _Round | None = None
        self._last_round = 0
        self._out: set[int] = set()

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def excluded(self) -> list[int]:
        """Nodes out for the rest of the run (dropped, or named for misbehaving)."""
        return sorted(self._out)

    @property
    def round(self) -> int | None:
        return self._round.number if self._round else None

    @property
    def survivors(self) -> list[int]:
        if self._round is None or self._round.view is None:
            raise SecAggError("the round's survivors are not fixed yet")
        return list(self._round.view)

    def masked_with(self, node: int) -> list[int]:
        """The nodes ``node`` was asked to mask with in the current round."""
        return list(self._round.peers.get(node, [])) if self._round else []

    # ---- setup ---------------------------------------------------------------------------------------
    def add_advertisement(self, node: Any, ad: Mapping[str, Any]) -> None:
        """Record one node's signed advertisement (checked against its own identity key, so a node
        that sends garbage is dropped here, named, instead of making every other node abort)."""
        nid = self._known(node)
        if self._keys_closed:
            raise SecAggError(f"the advertisement of node {nid} arrived after the key list was sent out")
        try:
            clean = read_advertisement(ad)
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"the advertisement of node {nid} is malformed ({exc})") from None
        if not verify(clean["identity"], clean["sig"], advertisement_message(self.run_id, nid, clean)):
            raise SecAggError(f"the advertisement of node {nid} is not signed by the identity key it names")
        if (clean["t"], clean["k"]) != (self.threshold, self.neighbours):
            raise SecAggError(f"node {nid} advertised for threshold {clean['t']} and {clean['k']} neighbours")
        self._ads[nid] = clean

    def advertisements(self) -> dict[int, dict[str, Any]]:
        """Close the first exchange: every advertisement, for every advertiser."""
        if len(self._ads) < self.threshold:
            raise TooFewSurvivors(
                f"only {len(self._ads)} of {len(self.node_ids)} nodes advertised keys; "
                f"the threshold is {self.threshold}",
                "wait for more hospitals or start the run with a lower threshold",
            )
        self._keys_closed = True
        self.hoods = closed_neighbourhoods(self.run_id, self._ads, self.neighbours)
        return {nid: dict(ad) for nid, ad in sorted(self._ads.items())}

    def add_setup(self, node: Any, reply: Mapping[str, Any]) -> None:
        """Record one node's setup: its sealed shares of its first mask key and its signed statement."""
        nid = self._known(node)
        if not self._keys_closed or nid not in self._ads:
            raise SecAggError(f"setup from node {nid}, which is not in the distributed key list")
        if bytes(reply.get("participants", b"")) != participants_digest(self.run_id, sorted(self._ads)):
            raise SecAggError(f"node {nid} set up for another participant set")
        shares = {
            h: ciphertext(c, f"setup share from node {nid}")
            for h, c in by_node(reply.get("shares") or {}, "setup shares").items()
        }
        if set(shares) != set(self.hoods[nid]):
            raise SecAggError(f"node {nid} dealt setup shares to {sorted(shares)}, not its neighbourhood")
        blob = commitments.checked(reply.get("s_commits"), f"the setup share commitments of node {nid}")
        self._setup[nid] = {
            "shares": shares,
            "sig": bytes(reply["sig"]),
            "s_pk": self._ads[nid]["s_pk"],
            "s_commits": blob,
        }
        self._setup_commits[nid] = commitments.unpack(
            blob, self.hoods[nid], f"the setup share commitments of node {nid}"
        )

    # ---- per round -----------------------------------------------------------------------------------
    def start_round(self, round_: int) -> dict[int, dict[str, Any]]:
        """Open a round; returns each active node's mask request {"round", "peers": {v: entry}}.

        An entry is v's public mask key for the round, the signed statement that announced it and
        this node's sealed share of v's private mask key. Nodes with fewer than t active neighbours
        (themselves included) cannot mask and sit the round out.
        """
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ <= self._last_round:
            raise SecAggError(f"round {round_!r} must be an int greater than the last round {self._last_round}")
        if self._round is not None and self._round.status == "open":
            raise SecAggError(f"round {self._round.number} is still open", "finish or abort it first")
        prev = self._round
        if prev is None:
            holders = {
                v: (s["s_pk"], s["shares"], {"sig": s["sig"], "s_commits": s["s_commits"]})
                for v, s in self._setup.items()
            }
            key_commits = self._setup_commits
        else:
            holders = {
                v: (
                    prev.statements[v]["next_s_pk"],
                    prev.next_cts[v],
                    {f: prev.statements[v][f] for f in ("sig", "active", "b_hash", "b_commits", "s_commits")},
                )
                for v in prev.contributors
            }
            key_commits = prev.s_commit_maps
        active = sorted(set(holders) - self._out)
        holding = len(active)
        while True:  # a node needs t active neighbours (itself included) to mask; drop those that cannot
            active_set = set(active)
            keep = [u for u in active if len(active_set.intersection(self.hoods[u])) >= self.threshold]
            if keep == active:
                break
            active = keep
        if len(active) < self.threshold:
            raise TooFewSurvivors(
                f"only {holding} nodes hold mask keys for round {round_}; the threshold is {self.threshold}",
                "the run cannot continue with secure aggregation",
            )
        self._last_round = round_
        rnd = _Round(
            round_,
            active,
            {v: holders[v][0] for v in active},
            {v: key_commits[v] for v in active},
            _ModularSum(self.vector_length),
            keys_dealt_in=SETUP_ROUND if prev is None else prev.number,
        )
        requests = {}
        for u in active:
            peers = sorted(active_set.intersection(self.hoods[u]))
            rnd.peers[u] = peers
            requests[u] = {
                "round": round_,
                "peers": {v: {"s_pk": holders[v][0], "ct": holders[v][1][u], **holders[v][2]} for v in peers},
            }
        self._round = rnd
        return requests

    def add_masked(self, node: Any, reply: Mapping[str, Any]) -> None:
        """Add one node's masked reply to the running sum. A late, duplicate or malformed reply raises
        and changes nothing (the node then counts as dropped)."""
        rnd = self._open_round()
        nid = node_id(node)
        if rnd.view is not None:
            raise SecAggError(f"the masked input of node {nid} arrived after the round's survivors were fixed")
        if nid not in rnd.peers or nid in rnd.statements:  # peers: the active nodes; statements: who sent
            raise SecAggError(f"node {nid} is not expected to send a masked input for round {rnd.number}")
        masked = np.asarray(reply.get("masked"))
        if masked.dtype != np.uint64 or masked.shape != (self.vector_length,):
            raise SecAggError(f"the masked input of node {nid} is not uint64 of length {self.vector_length}")
        peers = rnd.peers[nid]
        if sorted(int(v) for v in reply.get("active", [])) != peers:
            raise SecAggError(f"node {nid} masked with {sorted(reply.get('active', []))}, not with {peers}")
        b_cts = self._bundle(nid, reply.get("b_shares"), peers, "self-mask shares")
        s_cts = self._bundle(nid, reply.get("next_s_shares"), peers, "next mask-key shares")
        b_blob = commitments.checked(reply.get("b_commits"), f"the self-mask commitments of node {nid}")
        s_blob = commitments.checked(reply.get("s_commits"), f"the mask-key commitments of node {nid}")
        b_map = commitments.unpack(b_blob, peers, f"the self-mask commitments of node {nid}")
        s_map = commitments.unpack(s_blob, peers, f"the mask-key commitments of node {nid}")
        statement = {
            "active": peers,
            "b_hash": bytes(reply["b_hash"]),
            "next_s_pk": keys.check_key_bytes(reply.get("next_s_pk"), f"next mask key of node {nid}"),
            "b_commits": b_blob,
            "s_commits": s_blob,
            "sig": bytes(reply["sig"]),
        }
        rnd.sum.add(masked)
        rnd.contributors.append(nid)
        rnd.statements[nid], rnd.b_cts[nid], rnd.next_cts[nid] = statement, b_cts, s_cts
        rnd.b_commit_maps[nid], rnd.s_commit_maps[nid] = b_map, s_map

    def fast_path(self) -> bool:
        """Whether every active node's input arrived (then only self-mask shares are needed)."""
        rnd = self._open_round()
        return sorted(rnd.contributors) == rnd.active

    def unmask_fast_requests(self) -> dict[int, dict[str, Any]]:
        """Fast path: each contributor is asked for its self-mask shares of the nodes it masked with."""
        rnd = self._fix_survivors("fast")
        return {
            h: {
                "round": rnd.number,
                "b_share_ciphertexts": {w: rnd.b_cts[w][h] for w in rnd.peers[h]},
                "statements": {w: rnd.statements[w] for w in rnd.peers[h]},
            }
            for h in cast(list[int], rnd.view)  # fixed by _fix_survivors
        }

    def view_requests(self) -> dict[int, dict[str, Any]]:
        """Consistency path, step 1: ask every survivor to sign the round's one view of who survived."""
        rnd = self._fix_survivors("consistency")
        view = cast(list[int], rnd.view)  # fixed by _fix_survivors
        return {h: {"round": rnd.number, "survivors": list(view)} for h in view}

    def add_view_signature(self, node: Any, signature: Any) -> None:
        rnd = self._open_round()
        nid = node_id(node)
        if rnd.view is None or nid not in rnd.in_view:
            raise SecAggError(f"a view signature from node {nid}, which is not a survivor")
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIG_BYTES:
            raise SecAggError(f"the view signature of node {nid} is malformed")
        rnd.view_sigs[nid] = bytes(signature)

    def unmask_requests(self) -> dict[int, dict[str, Any]]:
        """Consistency path, step 2: each signer gets the view, the signatures that back it for the
        neighbourhoods it holds shares of, and its sealed self-mask shares of surviving neighbours."""
        rnd = self._open_round()
        if rnd.path != "consistency":
            raise SecAggError("view signatures are only gathered on the consistency path")
        if len(rnd.view_sigs) < self.threshold:
            raise TooFewSurvivors(
                f"only {len(rnd.view_sigs)} survivors signed the view of round {rnd.number}; "
                f"{self.threshold} are needed",
                "the round cannot be unmasked; nothing was revealed",
            )
        requests = {}
        for h in sorted(rnd.view_sigs):
            backers = set().union(*(self.hoods[w] for w in rnd.peers[h]))
            alive = [w for w in rnd.peers[h] if w in rnd.in_view]
            requests[h] = {
                "round": rnd.number,
                "survivors": list(cast(list[int], rnd.view)),
                "signatures": {z: rnd.view_sigs[z] for z in sorted(backers) if z in rnd.view_sigs},
                "b_share_ciphertexts": {w: rnd.b_cts[w][h] for w in alive},
                "statements": {w: rnd.statements[w] for w in alive},
            }
        return requests

    def finish(self, revealed: Mapping[Any, Mapping[str, Any]]) -> tuple[np.ndarray, RoundOutcome]:
        """Unmask the round from the replies; returns (modular sum of the survivors' inputs, outcome).

        Raises ``TooFewSurvivors`` (the round stays open) when some secret lacks t good shares, and
        ``TamperingDetected`` naming a dealer whose own signed shares do not reconstruct.
        """
        rnd = self._open_round()
        if rnd.view is None:
            raise SecAggError(f"round {rnd.number} has no survivor list yet")
        view = rnd.in_view
        outcome = RoundOutcome(survivors=list(rnd.view), dropped=sorted(set(rnd.active) - view))
        replies = {}
        for holder, reply in by_node(revealed, "unmask replies").items():
            if holder not in view:
                continue
            try:
                replies[holder] = (by_node(reply.get("b") or {}, "b"), by_node(reply.get("s") or {}, "s"))
            except SecAggError as exc:
                outcome.blamed[holder] = f"sent a malformed unmask reply ({exc.problem})"
        outcome.silent = sorted(set(rnd.view) - set(replies) - set(outcome.blamed))
        unmasks: list[tuple[bytes, int]] = []
        for w in rnd.view:  # w's shares are held by its peers: per node O(k), not O(n)
            shares = {h: replies[h][0][w] for h in rnd.peers[w] if h in replies and w in replies[h][0]}
            seed = self._reconstruct(
                shares,
                w,
                rnd.number,
                STAGE_B_SHARE,
                rnd.b_commit_maps[w],
                outcome,
                lambda s, w=w: (
                    len(s) == SEED_BYTES and seed_hash(self.run_id, rnd.number, w, s) == rnd.statements[w]["b_hash"]
                ),
            )
            unmasks.append((seed, -1))
        for d in outcome.dropped:
            shares = {h: replies[h][1][d] for h in rnd.peers[d] if h in replies and d in replies[h][1]}
            sk = self._reconstruct(
                shares,
                d,
                rnd.keys_dealt_in,
                STAGE_S_SHARE,
                rnd.key_commits[d],
                outcome,
                lambda s, d=d: len(s) == keys.KEY_BYTES and keys.public_key_of(s) == rnd.keys[d],
            )
            for u in rnd.peers[d]:
                if u in view:
                    seed = masking.pairwise_seed(self.run_id, rnd.number, d, sk, u, rnd.keys[u])
                    unmasks.append((seed, -masking.pairwise_sign(u, d)))
        total = rnd.sum.take_total()  # nothing below can fail: the sum leaves the round
        masking.add_masks(total, unmasks)
        rnd.status, rnd.sum = "finished", _ModularSum(0)
        self._out |= set(outcome.dropped) | set(outcome.blamed)
        return total, outcome

    def abort_round(self, blame: Sequence[int] = ()) -> None:
        """Give up the open round without a result; its non-contributors and ``blame`` are out for good."""
        rnd = self._open_round()
        rnd.status = "aborted"
        self._out |= set(rnd.active) - set(rnd.contributors) | set(blame)
        if rnd.path is not None:  # shares may have been revealed: nobody of this round continues unchecked
            self._out |= set(rnd.active) - set(rnd.view or [])
        rnd.sum = _ModularSum(0)

    # ---- helpers -------------------------------------------------------------------------------------
    def _known(self, value: Any) -> int:
        nid = node_id(value)
        if nid not in self.node_ids:
            raise SecAggError(f"node {nid} is not one of this run's nodes")
        return nid

    def _open_round(self) -> _Round:
        if self._round is None or self._round.status != "open":
            raise SecAggError("no round is open", "call start_round() first")
        return self._round

    def _fix_survivors(self, path: str) -> _Round:
        rnd = self._open_round()
        if rnd.path is not None and rnd.path != path:
            raise SecAggError(f"round {rnd.number} is already on the {rnd.path} path")
        if rnd.view is None:
            if len(rnd.contributors) < self.threshold:
                raise TooFewSurvivors(
                    f"only {len(rnd.contributors)} of {len(rnd.active)} nodes sent masked inputs "
                    f"for round {rnd.number}; the threshold is {self.threshold}",
                    "the round cannot be unmasked; nothing was revealed",
                )
            if path == "fast" and sorted(rnd.contributors) != rnd.active:
                raise SecAggError("the fast path needs every active node's input")
            rnd.view, rnd.path = sorted(rnd.contributors), path
            rnd.in_view = frozenset(rnd.view)
        return rnd

    def _bundle(self, nid: int, value: Any, holders: list[int], what: str) -> dict[int, bytes]:
        cts = {h: ciphertext(c, f"{what} from node {nid}") for h, c in by_node(value or {}, what).items()}
        if sorted(cts) != holders:
            raise SecAggError(f"node {nid} dealt {what} to {sorted(cts)}, not to the nodes it masked with")
        return cts

    def _reconstruct(
        self,
        shares: dict[int, Any],
        owner: int,
        dealt_in: int,
        stage: str,
        commits: dict[int, bytes],
        outcome: RoundOutcome,
        good,
    ) -> bytes:
        """``owner``'s secret from its holders' shares: a share that is malformed, or is not the one the
        owner's signed statement committed to for that holder, is dropped and its holder (the sender)
        named; a secret whose committed shares do not rebuild it names its dealer."""
        t = self.threshold
        valid: dict[int, bytes] = {}
        for h, raw in shares.items():
            if h in outcome.blamed:
                continue
            if not isinstance(raw, (bytes, bytearray)) or len(raw) != shamir.SHARE_BYTES:
                outcome.blamed[h] = f"sent a malformed share of node {owner}'s {_what(stage)}"
            elif share_hash(self.run_id, dealt_in, stage, owner, h, bytes(raw)) != commits.get(h):
                outcome.blamed[h] = f"sent a share of node {owner}'s {_what(stage)} that node {owner} never dealt"
            else:
                valid[h] = bytes(raw)
        if len(valid) < t:
            raise TooFewSurvivors(
                f"only {len(valid)} good shares of node {owner}'s {_what(stage)} for round "
                f"{cast(_Round, self._round).number}; {t} are needed",
                "the round fails; the model is unchanged",
            )
        secret = self._combine(valid, good)
        if secret is None:
            error = TamperingDetected(
                f"node {owner} dealt shares of its {_what(stage)} that do not reconstruct it",
                "the round fails; that node is left out of the rest of the run",
            )
            error.blame = [owner]
            raise error
        return secret

    def _combine(self, shares: dict[int, bytes], good) -> bytes | None:
        """The secret from t of the shares. Every share was checked against its dealer's signed
        commitment and ``good`` checks the secret against the dealer's signed hash of it, so any t
        shares of an honest dealer rebuild it; checking the extra shares too would cost one
        interpolation each (SecAgg+ holders differ per owner, so nothing is shared between owners)."""
        if len(shares) < self.threshold:
            return None
        try:
            secret = shamir.combine(dict(sorted(shares.items())[: self.threshold]), self.threshold)
        except ShamirError:
            return None
        return secret if good(secret) else None


def _what(stage: str) -> str:
    return "self-mask seed" if stage == STAGE_B_SHARE else "round mask key"
