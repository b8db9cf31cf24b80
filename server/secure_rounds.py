"""The coordinator's half of secure aggregation, over Flower messages.

Wraps ``secure_aggregation.SecAggServer``: once per run, two setup exchanges (public keys, then
encrypted key shares); every round, the train messages carry each node's mask request, the
replies carry masked updates (weight-scaled, quantised model deltas) that only ever enter a
running modular sum, and one unmask exchange with the survivors recovers the sum. The server
never sees one hospital's update: ``train_round`` returns only the federation's weighted mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedcare import protocol
from fedcare.errors import FedcareError
from secure_aggregation import Quantizer, SecAggError, SecAggServer, TooFewSurvivors
from secure_aggregation.records import flatten, unflatten, unpack_vector

Progress = Callable[[str], None]


def auto_threshold(n_nodes: int) -> int:
    """A strict majority (and at least 2): the fewest survivors a round can finish with."""
    return max(2, n_nodes // 2 + 1)


def vector_length(arrays: ArrayRecord) -> int:
    """Model parameters plus the weight that rides along as the last element."""
    return sum(int(np.prod(a.shape)) for a in arrays.values()) + 1


@dataclass
class SecureRoundOutcome:
    mean_arrays: ArrayRecord | None      # global + weighted mean delta; None when the round failed
    total_weight: int = 0
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)   # node -> why its input was not used
    reason: str | None = None                             # why the whole round failed


class SecureAggregation:
    """One run's secure aggregation, server side."""

    def __init__(self, grid: Grid, run_config: dict, threshold: int, clip: float, timeout: float,
                 progress: Progress) -> None:
        self.grid, self.config, self.timeout, self.progress = grid, run_config, timeout, progress
        self.threshold = threshold
        self.quantizer = Quantizer(clip)
        self.server: SecAggServer | None = None

    def _query(self, node_payloads: dict[int, dict], message_type: str) -> list[Message]:
        messages = []
        for node, payload in node_payloads.items():
            content = RecordDict({protocol.CONFIG: ConfigRecord(self.config | flatten(payload, protocol.SECAGG))})
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
        return list(self.grid.send_and_receive(messages, timeout=self.timeout))

    def setup(self, nodes: list[int], run_id: int, arrays: ArrayRecord) -> list[int]:
        """Agree keys with ``nodes``; returns the nodes that completed setup."""
        threshold = self.threshold or auto_threshold(len(nodes))
        if len(nodes) < 2 or threshold > len(nodes):
            raise FedcareError(
                f"secure aggregation needs at least 2 hospitals and a threshold <= the hospital count "
                f"({len(nodes)} hospital(s), threshold {threshold})",
                "add hospitals, lower secagg-threshold, or run with secure-aggregation=false",
            )
        self.quantizer.check_capacity(len(nodes))
        self.server = SecAggServer(run_id, threshold, nodes, vector_length(arrays))
        advertise = {n: {"threshold": threshold, "nodes": list(nodes), "run": run_id} for n in nodes}
        for msg in self._ok(self._query(advertise, protocol.SECAGG_ADVERTISE), "key advertisement"):
            self.server.add_public_keys(msg.metadata.src_node_id, _payload(msg))
        keys = self.server.public_keys()
        share = {n: {"threshold": threshold, "keys": keys} for n in keys}
        for msg in self._ok(self._query(share, protocol.SECAGG_SHARE_KEYS), "key sharing"):
            self.server.add_setup_shares(msg.metadata.src_node_id, _payload(msg)["shares"])
        self.progress(f"secure aggregation: keys agreed with {len(keys)} hospitals, threshold {threshold}")
        return sorted(keys)

    def _ok(self, replies: Iterable[Message], stage: str) -> list[Message]:
        good = []
        for msg in replies:
            if msg.has_error() or protocol.REFUSAL in msg.content.config_records:
                why = msg.error.reason if msg.has_error() else msg.content.config_records[protocol.REFUSAL]["reason"]
                self.progress(f"secure aggregation {stage}: node {msg.metadata.src_node_id} dropped ({_first_line(why)})")
                continue
            good.append(msg)
        return good

    def audit_summary(self) -> dict:
        """What the audit log records about this round's secure aggregation."""
        assert self.server is not None
        try:
            survivors = sorted(int(v) for v in self.server.survivors)
        except SecAggError:  # the round ended before its survivors were fixed
            survivors = []
        return {"threshold": self.server.threshold, "survivors": survivors}

    def attach_requests(self, rnd: int, messages: list[Message]) -> list[Message]:
        """Open round ``rnd`` and put each active node's mask request into its train message.

        Nodes that dropped out earlier in the run get no message (their keys were revealed).
        Raises ``TooFewSurvivors`` when fewer than the threshold still hold keys.
        """
        assert self.server is not None
        requests = self.server.start_round(rnd)
        kept = []
        for msg in messages:
            request = requests.get(msg.metadata.dst_node_id)
            if request is not None:
                # Flower's strategies give every train message the same RecordDict: copy, then add.
                config = dict(msg.content[protocol.CONFIG]) | flatten(request, protocol.SECAGG)
                msg.content = RecordDict({**dict(msg.content.items()), protocol.CONFIG: ConfigRecord(config)})
                kept.append(msg)
        return kept

    def aggregate(self, rnd: int, replies: list[Message], arrays: ArrayRecord, failed: dict[str, str],
                  names: dict[int, str]) -> list[Message]:
        """The round's replies reduced to one carrying only the weighted mean model and total weight.

        That one message goes to the Flower strategy's ``aggregate_train`` (FedAvg, FedProx and
        FedAdam then work unchanged); an empty list means the round failed and the model stays.
        """
        outcome = self.finish_round(rnd, replies, arrays)
        for node, why in outcome.failed.items():
            failed[names.get(node, f"node {node}")] = why
        if outcome.mean_arrays is None:
            failed["secure aggregation"] = outcome.reason or "failed"
            self.progress(outcome.reason or f"round {rnd}: secure aggregation failed")
            return []
        carrier = next(m for m in replies if m.metadata.src_node_id in outcome.survivors)
        carrier.content = RecordDict({
            protocol.ARRAYS: outcome.mean_arrays,
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: float(outcome.total_weight)}),
        })
        return [carrier]

    def finish_round(self, rnd: int, replies: list[Message], arrays: ArrayRecord) -> SecureRoundOutcome:
        """Sum the masked replies, unmask with the survivors, return the weighted mean model."""
        assert self.server is not None
        outcome = SecureRoundOutcome(None)
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                reply = _payload(msg)
                reply["masked"] = unpack_vector(reply.get("masked"), f"the masked update of node {node}")
                self.server.add_masked(node, reply)
            except (SecAggError, KeyError) as exc:
                outcome.failed[node] = f"masked update rejected: {exc}"
        try:
            requests = self.server.unmask_requests()
            revealed = {}
            for msg in self._ok(self._query(requests, protocol.SECAGG_UNMASK), f"unmask (round {rnd})"):
                revealed[msg.metadata.src_node_id] = _payload(msg)
            outcome.survivors, outcome.dropped = list(self.server.survivors), list(self.server.dropped)
            total = self.server.finish(revealed)
        except TooFewSurvivors as exc:
            self.server.abort_round()
            outcome.reason = f"round {rnd} failed, model unchanged: {exc.problem}"
            return outcome
        mean_delta, outcome.total_weight = self.quantizer.decode_mean(total, len(outcome.survivors))
        outcome.mean_arrays = apply_delta(arrays, mean_delta)
        return outcome


def apply_delta(arrays: ArrayRecord, delta: np.ndarray) -> ArrayRecord:
    """global + delta, where ``delta`` is the concatenation of every array's flattened change."""
    out, start = {}, 0
    for name, array in arrays.items():
        current = array.numpy()
        size = current.size
        out[name] = Array((current + delta[start:start + size].reshape(current.shape)).astype(current.dtype))
        start += size
    return ArrayRecord(out)


def _payload(msg: Message) -> dict:
    """A node's reply payload: the ``secagg/`` keys of its hospital record."""
    record = dict(msg.content.config_records.get(protocol.HOSPITAL, {}))
    if not any(key.startswith(protocol.SECAGG) for key in record):
        raise KeyError("the reply carries no secure-aggregation payload")
    return unflatten(record, protocol.SECAGG)


def _first_line(text: str | None) -> str:
    return (text or "no reason").splitlines()[0]
