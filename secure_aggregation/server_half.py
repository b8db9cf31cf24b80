"""The server (coordinator) half of secure aggregation: routing, a running masked sum, unmasking.

The server relays public keys and encrypted shares it cannot read, adds masked inputs into one
running modular sum, and at the end of a round removes the masks using the shares the nodes
reveal: each survivor's self mask PRG(b) (from >= t b-shares) and, for each dropped node, the
pairwise masks it shared with the survivors (from >= t shares of its round mask key).

Why no individual vector is ever stored: the only array the server keeps for a round is the
sum (``_ModularSum``), and a masked input is added into it and then forgotten; no method returns
anything but the final unmasked sum. Nodes dropped once stay out for the rest of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from secure_aggregation import keys, masking, shamir, validation
from secure_aggregation.errors import SecAggError, ShamirError, TamperingDetected, TooFewSurvivors
from secure_aggregation.prg import SEED_BYTES
from secure_aggregation.validation import by_node, check_threshold, ciphertext


class _ModularSum:
    """Running sum modulo 2**64 of equal-length uint64 vectors; the addends are not kept."""

    __slots__ = ("_total", "count")

    def __init__(self, length: int) -> None:
        self._total = np.zeros(length, dtype=np.uint64)
        self.count = 0

    def add(self, vector: np.ndarray) -> None:
        np.add(self._total, vector, out=self._total)
        self.count += 1

    def copy_total(self) -> np.ndarray:
        return self._total.copy()


class _Round:
    """What the server holds for one round: the sum, and ciphertexts it routes but cannot read."""

    __slots__ = ("number", "active", "s_pks", "sum", "contributors", "b_cts", "next_keys", "survivors", "status")

    def __init__(self, number: int, active: list[int], s_pks: dict[int, bytes], length: int) -> None:
        self.number = number
        self.active = active
        self.s_pks = s_pks
        self.sum = _ModularSum(length)
        self.contributors: list[int] = []
        self.b_cts: dict[int, dict[int, bytes]] = {}
        self.next_keys: dict[int, tuple[bytes, dict[int, bytes]]] = {}
        self.survivors: list[int] | None = None
        self.status = "open"

    @property
    def dropped(self) -> list[int]:
        present = self.contributors if self.survivors is None else self.survivors
        return sorted(set(self.active) - set(present))


class SecAggServer:
    """Server half for one run. Not persisted: a server restart needs a new run (new setup)."""

    def __init__(self, run_id: keys.RunId, threshold: int, node_ids: Sequence[int], vector_length: int) -> None:
        self.run_id = run_id
        self.node_ids = validation.node_ids(node_ids, "node_ids")
        self.threshold = check_threshold(threshold, len(self.node_ids))
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
            raise SecAggError(f"vector_length must be an int >= 1, got {vector_length!r}")
        self.vector_length = vector_length
        self._public_keys: dict[int, dict[str, bytes]] = {}
        self._keys_closed = False
        self._setup_cts: dict[int, dict[int, bytes]] = {}
        self._participants: list[int] | None = None
        self._round: _Round | None = None
        self._last_round = 0
        self._dropped: set[int] = set()

    # ---- read-only views -------------------------------------------------------------------

    @property
    def dropped(self) -> list[int]:
        """Nodes declared dropped in some round; they are out for the rest of the run."""
        return sorted(self._dropped)

    @property
    def round(self) -> int | None:
        """The current (or last) round number."""
        return self._round.number if self._round else None

    @property
    def survivors(self) -> list[int]:
        """The current round's survivors once fixed (their count is decode_mean's n_nodes)."""
        if self._round is None or self._round.survivors is None:
            raise SecAggError("the round's survivors are not fixed yet", "call unmask_requests() first")
        return list(self._round.survivors)

    # ---- setup, exchange 1: public keys ------------------------------------------------------

    def add_public_keys(self, node_id: Any, public_keys: Mapping[str, bytes]) -> None:
        """Record one node's advertised {"c_pk", "s_pk"}."""
        nid = self._known(node_id)
        if self._keys_closed:
            raise SecAggError(f"public keys of node {nid} arrived after the key list was sent out; ignored")
        if not isinstance(public_keys, Mapping):
            raise SecAggError(f"public keys of node {nid} must be a dict with c_pk and s_pk")
        self._public_keys[nid] = {
            "c_pk": keys.check_key_bytes(public_keys.get("c_pk"), f"c_pk of node {nid}"),
            "s_pk": keys.check_key_bytes(public_keys.get("s_pk"), f"s_pk of node {nid}"),
        }

    def public_keys(self) -> dict[int, dict[str, bytes]]:
        """Close exchange 1 and return every advertised key pair, to send to each advertiser."""
        if len(self._public_keys) < self.threshold:
            raise TooFewSurvivors(
                f"only {len(self._public_keys)} of {len(self.node_ids)} nodes advertised keys; "
                f"the threshold is {self.threshold}",
                "wait for more hospitals or start the run with a lower threshold",
            )
        self._keys_closed = True
        return {nid: dict(pk) for nid, pk in sorted(self._public_keys.items())}

    # ---- setup, exchange 2: encrypted shares of the first mask keys -------------------------

    def add_setup_shares(self, node_id: Any, ciphertexts: Mapping[Any, bytes]) -> None:
        """Record one node's share ciphertexts {recipient: ciphertext} (one per advertiser)."""
        nid = self._known(node_id)
        if not self._keys_closed or nid not in self._public_keys:
            raise SecAggError(f"setup shares from node {nid}, which is not in the distributed key list")
        if self._participants is not None:
            raise SecAggError(f"setup shares from node {nid} arrived after round 1 started; ignored")
        cts = {
            r: ciphertext(c, f"setup share from node {nid}") for r, c in by_node(ciphertexts, "setup shares").items()
        }
        if set(cts) != set(self._public_keys):
            raise SecAggError(f"node {nid} sent setup shares for {sorted(cts)}, expected {sorted(self._public_keys)}")
        self._setup_cts[nid] = cts

    # ---- per round ----------------------------------------------------------------------------

    def start_round(self, round_: int) -> dict[int, dict[str, Any]]:
        """Open a round; returns the mask request for each active node.

        Each request is {"round", "active": [ids], "s_public_keys": {id: bytes},
        "s_share_ciphertexts": {sender: bytes}}: the node passes the last two to
        ``SecAggNode.receive_keys`` and then calls ``mask``.
        """
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ <= self._last_round:
            raise SecAggError(f"round {round_!r} must be an int greater than the last round {self._last_round}")
        if self._round is not None and self._round.status == "open":
            raise SecAggError(
                f"round {self._round.number} is still open", "call finish() or abort_round() before the next round"
            )
        if self._participants is None:
            active = sorted(self._setup_cts)
            s_pks = {v: self._public_keys[v]["s_pk"] for v in active}
            routed = {u: {v: self._setup_cts[v][u] for v in active} for u in active}
        else:
            prev = self._round
            holders = {} if prev is None else prev.next_keys
            active = sorted(set(holders) - self._dropped)
            s_pks = {v: holders[v][0] for v in active}
            routed = {u: {v: holders[v][1][u] for v in active} for u in active}
        if len(active) < self.threshold:
            raise TooFewSurvivors(
                f"only {len(active)} nodes hold mask keys for round {round_}; the threshold is {self.threshold}",
                "the run cannot continue with secure aggregation; start a new run",
            )
        if self._participants is None:
            self._participants = active
            self._setup_cts = {}
        self._last_round = round_
        self._round = _Round(round_, active, s_pks, self.vector_length)
        return {
            u: {"round": round_, "active": list(active), "s_public_keys": dict(s_pks), "s_share_ciphertexts": routed[u]}
            for u in active
        }

    def add_masked(self, node_id: Any, reply: Mapping[str, Any]) -> None:
        """Add one node's ``SecAggNode.mask`` reply: the masked vector goes into the running sum,
        the encrypted shares are kept for routing. Raises (and changes nothing) for a late,
        duplicate or malformed reply.
        """
        rnd = self._open_round()
        nid = validation.node_id(node_id)
        if rnd.survivors is not None:
            raise SecAggError(
                f"masked input from node {nid} for round {rnd.number} arrived after the survivor list "
                "was fixed; ignored"
            )
        if nid not in rnd.active:
            raise SecAggError(f"node {nid} is not active in round {rnd.number}; its input is ignored")
        if nid in rnd.contributors:
            raise SecAggError(f"node {nid} already sent its masked input for round {rnd.number}")
        masked = np.asarray(reply.get("masked"))
        if masked.dtype != np.uint64 or masked.shape != (self.vector_length,):
            raise SecAggError(
                f"masked input from node {nid} must be uint64 of length {self.vector_length}, "
                f"got {masked.dtype} {masked.shape}"
            )
        b_cts = self._bundle(nid, reply.get("b_shares"), rnd, "b-shares")
        s_cts = self._bundle(nid, reply.get("next_s_shares"), rnd, "next mask-key shares")
        next_pk = keys.check_key_bytes(reply.get("next_s_pk"), f"next_s_pk of node {nid}")
        rnd.sum.add(masked)
        rnd.contributors.append(nid)
        rnd.b_cts[nid] = b_cts
        rnd.next_keys[nid] = (next_pk, s_cts)

    def unmask_requests(self) -> dict[int, dict[str, Any]]:
        """Fix the survivors (nodes whose masked input arrived) and return each survivor's request:
        {"round", "survivors": [ids], "dropped": [ids], "b_share_ciphertexts": {sender: bytes}}.
        Fewer than threshold survivors: TooFewSurvivors, nothing is sent, the round stays open.
        """
        rnd = self._open_round()
        if rnd.survivors is None:
            if len(rnd.contributors) < self.threshold:
                raise TooFewSurvivors(
                    f"only {len(rnd.contributors)} of {len(rnd.active)} nodes sent masked inputs for round "
                    f"{rnd.number}; the threshold is {self.threshold}",
                    "wait for more replies or abort the round (nothing has been revealed)",
                )
            rnd.survivors = sorted(rnd.contributors)
        surv, drop = rnd.survivors, rnd.dropped
        return {
            u: {
                "round": rnd.number,
                "survivors": list(surv),
                "dropped": list(drop),
                "b_share_ciphertexts": {v: rnd.b_cts[v][u] for v in surv},
            }
            for u in surv
        }

    def finish(self, revealed: Mapping[Any, Mapping[str, Mapping[Any, bytes]]]) -> np.ndarray:
        """Unmask the round from the survivors' ``SecAggNode.unmask`` replies; returns the modular sum
        of the survivors' encoded inputs (uint64). Fewer than threshold replies: TooFewSurvivors and
        the round stays open (more replies may still be added).
        """
        rnd = self._open_round()
        if rnd.survivors is None:
            raise SecAggError(f"round {rnd.number} has no survivor list yet", "call unmask_requests() first")
        surv, drop, t = rnd.survivors, rnd.dropped, self.threshold
        replies = by_node(revealed, "unmask replies")
        strangers = sorted(set(replies) - set(surv))
        if strangers:
            raise SecAggError(f"unmask replies from nodes {strangers} that are not survivors of round {rnd.number}")
        if len(replies) < t:
            raise TooFewSurvivors(
                f"only {len(replies)} of {len(surv)} survivors answered the unmask request for round "
                f"{rnd.number}; {t} are needed",
                "wait for more replies or abort the round",
            )
        b_shares: dict[int, dict[int, bytes]] = {v: {} for v in surv}
        s_shares: dict[int, dict[int, bytes]] = {d: {} for d in drop}
        for holder, reply in replies.items():
            b = by_node(reply.get("b", {}), f"b-shares from node {holder}")
            s = by_node(reply.get("s", {}), f"mask-key shares from node {holder}")
            if set(b) != set(surv) or set(s) != set(drop):
                raise SecAggError(
                    f"unmask reply from node {holder} covers b {sorted(b)} and s {sorted(s)}, "
                    f"expected b {surv} and s {drop}"
                )
            for v, share in b.items():
                b_shares[v][holder] = share
            for d, share in s.items():
                s_shares[d][holder] = share

        total = rnd.sum.copy_total()
        unmasks: list[tuple[bytes, int]] = []
        for v in surv:
            seed = self._reconstruct(b_shares[v], v, rnd.number, "self-mask seed")
            if len(seed) != SEED_BYTES:
                raise TamperingDetected(f"the self-mask seed of node {v} for round {rnd.number} has the wrong size")
            unmasks.append((seed, -1))
        for d in drop:
            sk = self._reconstruct(s_shares[d], d, rnd.number, "mask key")
            if len(sk) != keys.KEY_BYTES or keys.public_key_of(sk) != rnd.s_pks[d]:
                raise TamperingDetected(
                    f"the shares of node {d}'s round-{rnd.number} mask key do not reconstruct its public key",
                    "a share was corrupted or forged; abort the round",
                )
            for u in surv:
                seed = masking.pairwise_seed(self.run_id, rnd.number, d, sk, u, rnd.s_pks[u])
                unmasks.append((seed, -masking.pairwise_sign(u, d)))
        masking.add_masks(total, unmasks)
        rnd.status = "finished"
        rnd.sum = _ModularSum(0)
        self._dropped |= set(drop)
        return total

    def abort_round(self) -> None:
        """Give up the open round without a result. Active nodes that sent no masked input are
        dropped for the rest of the run (they hold no mask key for the next round, and some of
        their mask-key shares may have been revealed); the others continue.
        """
        rnd = self._open_round()
        rnd.status = "aborted"
        self._dropped |= set(rnd.dropped)
        rnd.sum = _ModularSum(0)

    # ---- helpers -------------------------------------------------------------------------------

    def _known(self, value: Any) -> int:
        nid = validation.node_id(value)
        if nid not in self.node_ids:
            raise SecAggError(f"node {nid} is not one of this run's nodes")
        return nid

    def _open_round(self) -> _Round:
        if self._round is None or self._round.status != "open":
            raise SecAggError("no round is open", "call start_round() first")
        return self._round

    def _bundle(self, nid: int, value: Any, rnd: _Round, what: str) -> dict[int, bytes]:
        cts = {r: ciphertext(c, f"{what} from node {nid}") for r, c in by_node(value or {}, what).items()}
        if set(cts) != set(rnd.active):
            raise SecAggError(
                f"node {nid} sent {what} for {sorted(cts)}, expected round {rnd.number}'s active nodes {rnd.active}"
            )
        return cts

    def _reconstruct(self, shares: dict[int, bytes], owner: int, round_: int, what: str) -> bytes:
        try:
            return shamir.combine(shares, self.threshold)
        except ShamirError as exc:
            raise TamperingDetected(
                f"the shares of node {owner}'s round-{round_} {what} do not combine ({exc.problem})",
                "a share was corrupted or forged; abort the round",
            ) from None
