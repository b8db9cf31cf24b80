"""Secure aggregation for fedcare: the coordinator learns only sums of each round's inputs.

Transport-agnostic (no Flower imports): a node half (``SecAggNode``) and a server half
(``SecAggServer``) whose inputs and outputs are plain dicts of bytes, ints, lists and numpy uint64
arrays, so they fit Flower ConfigRecords. Double masking after Bonawitz et al. (CCS 2017), in its
actively secure variant (signed keys, a consistency round), with SecAgg+'s sparse neighbourhoods
for large federations (Bell et al., CCS 2020). All arithmetic is modulo 2**64 on ``Quantizer``-
encoded vectors; every primitive comes from ``cryptography`` (X25519, HKDF-SHA256, AES-128-CTR
masks, AES-256-GCM sealed shares, Ed25519 signatures); Shamir sharing is over GF(2**521 - 1).

Protocol (n members of the hospital's pinned roster; t-of-(k+1) shares over each node's closed
neighbourhood N[u], k = n - 1 for the complete graph)

  Setup, once per run (2 exchanges):
    1. advertise   node -> server: its X25519 keys c (seals shares) and s (first mask key), signed
                   with its identity key over (run, node, name, t, k, the node list it was told).
    2. share_keys  server -> node: every advertisement. The node checks each signature against its
                   roster, one node per member, the same federation view everywhere, its own keys,
                   the hospital's minimum size; derives the neighbourhood graph from all the keys;
                   deals t-of-|N[u]| shares of its first mask key to N[u], each sealed to its holder
                   with the dealer's signature over the share's hash; signs the participant set.
  Every round r:
    3. mask        (in the train exchange) the node takes its neighbours' round keys with the
                   signed statements that announced them, masks x + PRG(b) + sum_v +/-PRG(k_uv) over
                   the neighbours whose keys it got, deals shares of b and of its next mask key, and
                   signs a statement (the set it masked with, a commitment to b, its next key).
    4a. fast path  nobody dropped: each node reveals the self-mask shares it holds, and nothing else.
    4b. consistency path  someone dropped: each survivor signs one view of who survived; then each
                   signer reveals self-mask shares of surviving neighbours and mask-key shares of
                   dropped ones, once t members of every neighbour's neighbourhood signed that view.
    The server sums the masked inputs, rebuilds each survivor's b and each dropped node's round
    key from >= t shares (checking each against the owner's signed commitment, dropping and naming
    any holder whose share its dealer never dealt), removes the masks, and gets the sum.

Threat model. The coordinator may deviate: relay what it likes, lie to different nodes, claim nodes
dropped, add nodes, substitute keys. With t a strict majority of every neighbourhood (plus the c
hospitals colluding with it: t > (|N| + c) / 2), honest nodes answer one unmask path per round and
sign one view, so no two honest holders of a node's shares act on different views: the coordinator
never removes both a node's self mask and the masks it shares with honest peers. It learns at most
sums of the inputs of at least t - c honest hospitals per round (the sum over a neighbourhood's
survivors in the complete graph: every survivor). Privacy, not correctness: a coordinator can
always make a round fail. Inputs must fit the quantisation range (``Quantizer`` raises rather than
wraps; the hospital clips first). The server half keeps its state in memory: a server restart
means a new run (new setup).

Modules: ``quantization`` (fixed point), ``prg`` (AES-128-CTR masks), ``keys`` (X25519, HKDF,
AES-GCM), ``identity`` (roster, signatures), ``graph`` (SecAgg+ parameters and neighbourhoods),
``shamir``, ``masking``, ``node_half``/``node_state``, ``server_half``, ``records`` (flatten payloads
for ConfigRecords). The whole message flow in one process, for tests: ``tests/support/secagg_inprocess.py``.
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
