"""Secure aggregation for fedcare: the server learns only the (weighted) sum of each round.

Transport-agnostic (no Flower imports): a node half (``SecAggNode``) and a server half
(``SecAggServer``) whose inputs and outputs are plain dicts of bytes, ints, lists and numpy
uint64 arrays, so they fit Flower ConfigRecords/ArrayRecords. Double masking after Bonawitz et
al. 2017 (SecAgg), with cross-silo simplifications: keys are agreed once per run.

Protocol (t-of-n, t > n/2; all arithmetic modulo 2**64 on ``Quantizer``-encoded vectors)

  Setup, once per run (2 exchanges):
    1. advertise   server -> node: run id, node id, t.   node -> server: {"c_pk", "s_pk"}
                   (X25519 public keys: c encrypts shares, s is the first round's mask key).
    2. share_keys  server -> node: every advertiser's {"c_pk", "s_pk"}.
                   node -> server: {recipient: AES-GCM ciphertext of a Shamir share of s_sk}.
  Every round r (2 exchanges; the first round's request also carries the setup shares):
    3. mask        server -> node: {"round", "active", "s_public_keys", "s_share_ciphertexts"}
                   (the active nodes' mask keys for r and this node's encrypted shares of them).
                   node -> server: {"masked": x + PRG(b) + sum_v +/-PRG(k_uv^r) (uint64),
                   "b_shares": {recipient: ct}, "next_s_pk": bytes, "next_s_shares": {recipient: ct}}.
    4. unmask      server -> survivor: {"round", "survivors", "dropped", "b_share_ciphertexts"}.
                   survivor -> server: {"b": {survivor: share}, "s": {dropped: share}}.
    The server sums the masked inputs, rebuilds each survivor's b and each dropped node's round
    mask key from >= t shares, removes PRG(b) and the dropped nodes' pairwise masks, and gets
    the sum of the survivors' inputs; the last element is the total weight (``decode_mean``).

Why the mask key rotates every round (a deviation from "one s key per run, masks derived per
round"): if one s key served the whole run, revealing a dropped node's s key in round r would
also unmask every earlier round in which that node survived (the server already learned its b
for those rounds), exposing its individual updates. So each masked reply announces a fresh
mask key for the node's next round and Shamir-shares it like at setup; a reveal then only
uncovers pairwise masks of that one round. The cost is one public key and n small ciphertexts
per node per round, and no extra message. Each encrypted share carries its owner's public mask
key, so a holder detects a relayed key that its owner never sent.

Threat model met. The server (and the network between server and nodes) is honest-but-curious:
it follows the protocol but may record everything it sees. It learns only the sum of the
survivors' inputs of each round (and the total weight), as long as fewer than t nodes collude
with it. Shares are encrypted end to end between nodes (X25519 + HKDF-SHA256 + AES-256-GCM) with
the run, round, stage, sender and recipient bound as associated data, so the relaying server
cannot read, redirect, replay or alter them undetected. Double masking protects a node whose
input arrives late after being declared dropped: its pairwise masks become recoverable, but
its self mask b is never revealed (honest nodes refuse to reveal b and s for the same node,
refuse to let a dropped node rejoin, and refuse to unmask a round twice with different lists),
and the server rejects late inputs outright. Dropout tolerance: a round completes while at
least t nodes send masked inputs and at least t of them answer the unmask request; nodes that
drop are out for the rest of the run.

Limits. The setup public keys (c_pk, s_pk) are relayed by the server and not signed by the
nodes: a server that substitutes them at setup (man in the middle) is outside this model; bind
the advertised keys to the nodes' registered identities (e.g. sign them with the SuperNode auth
key) if that matters. The majority threshold limits but does not remove what an actively malicious server
can do. The aggregate itself is not private: DP-SGD at each hospital protects it. Inputs must
fit the quantisation range (``Quantizer`` raises rather than wraps). The server half keeps
its state in memory: a server restart means a new run (new setup). Cost: uint64 vectors are
2x a float32 update; everything else is O(n) small ciphertexts per node per round.

Modules: ``quantization`` (fixed point), ``prg`` (AES-256-CTR masks), ``keys`` (X25519, HKDF,
AES-GCM), ``shamir``, ``masking``, ``node_half``/``node_state``, ``server_half``, ``records``
(flatten payloads for ConfigRecords), ``inprocess`` (reference flow), ``bench`` (costs).
"""

from __future__ import annotations

from secure_aggregation.errors import ClipRangeError, SecAggError, ShamirError, TamperingDetected, TooFewSurvivors
from secure_aggregation.node_half import SecAggNode
from secure_aggregation.prg import mask_vector
from secure_aggregation.quantization import Quantizer
from secure_aggregation.server_half import SecAggServer

__all__ = [
    "ClipRangeError",
    "Quantizer",
    "SecAggError",
    "SecAggNode",
    "SecAggServer",
    "ShamirError",
    "TamperingDetected",
    "TooFewSurvivors",
    "mask_vector",
]
