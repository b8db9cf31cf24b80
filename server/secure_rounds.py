"""The coordinator's half of secure aggregation, over Flower messages.

Wraps ``secure_aggregation.SecAggServer``: once per run, two setup exchanges (signed keys, then
sealed shares of the first mask keys); every round, the train messages carry each node's mask
request, the replies carry masked updates (weight-scaled, quantised model deltas) that only ever
enter a running modular sum, and the survivors unmask the sum: in one exchange when every hospital
answered (self-mask shares only), or in two when one dropped (each survivor signs one view of who
survived, then reveals what that view calls for). ``train_round`` returns only the federation's
weighted mean. Replies that fail a check are discarded and their sender named; at the end of a run
(finished or failed) every participant is told to delete its private key material.

Graph and threshold: from ``SPARSE_FROM`` hospitals on, SecAgg+'s sparse graph (Bell et al., CCS
2020) with the neighbourhood size k and threshold t that Google's federated-compute parameter finder
gives for ``CORRUPT_FRACTION`` colluding and ``DROPOUT_FRACTION`` dropping hospitals
(``secure_aggregation.graph``); a hospital's work then grows with log n. Below that, the complete
graph with the smallest t above (n + corrupt hospitals) / 2 (``secagg-threshold`` may ask for more):
it costs at most a hundred masks a round, and the finder's guarantee for small federations rests on
rounding the assumed colluders and dropouts down to zero or one (n = 10 gives k = 2, t = 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedcare import protocol, wire
from fedcare.errors import FedcareError
from secure_aggregation import Quantizer, SecAggError, SecAggServer, TooFewSurvivors, messages
from secure_aggregation.graph import find_parameters

Progress = Callable[[str], None]
Request = (
    messages.KeyAgreementRequest
    | messages.ShareKeysRequest
    | messages.ViewRequest
    | messages.UnmaskRequest
    | messages.EndRequest
)
Reply = TypeVar(
    "Reply",
    messages.AdvertiseReply,
    messages.ShareKeysReply,
    messages.MaskedUpdate,
    messages.ViewReply,
    messages.UnmaskReply,
)
CORRUPT_FRACTION = 0.05  # hospitals assumed to collude with a malicious coordinator (SecAgg+ parameters)
DROPOUT_FRACTION = 0.05  # hospitals assumed to drop in a round (SecAgg+ parameters)
END_TIMEOUT_S = 30.0  # the end-of-run message: best effort, nodes also expire abandoned keys
SPARSE_FROM = 100  # hospitals from which SecAgg+'s neighbourhoods replace the complete graph


def graph_parameters(n_nodes: int, threshold: int = 0) -> tuple[int, int]:
    """(t, k) for ``n_nodes``: SecAgg+'s neighbourhoods for large federations, else the complete graph."""
    sparse = (
        find_parameters(n_nodes, CORRUPT_FRACTION, DROPOUT_FRACTION, semi_malicious=True)
        if n_nodes >= SPARSE_FROM and not threshold
        else None
    )
    if sparse is not None and sparse.k + 1 < n_nodes:
        return sparse.t, sparse.k
    corrupt = math.floor(CORRUPT_FRACTION * n_nodes)
    t = max(2, (n_nodes + corrupt) // 2 + 1, threshold)
    return t, n_nodes - 1


def vector_length(arrays: ArrayRecord) -> int:
    """Model parameters plus the weight that rides along as the last element."""
    return sum(int(np.prod(a.shape)) for a in arrays.values()) + 1


@dataclass
class SecureRoundOutcome:
    mean_arrays: ArrayRecord | None  # global + weighted mean delta; None when the round failed
    total_weight: int = 0
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # node -> why it is out (named, by sender)
    silent: list[int] = field(default_factory=list)  # survivors that did not answer the unmask
    path: str = ""  # "fast" or "consistency"
    reason: str | None = None  # why the whole round failed


class SecureAggregation:
    """One run's secure aggregation, server side."""

    def __init__(
        self, grid: Grid, run_config: dict, threshold: int, clip: float, timeout: float, progress: Progress
    ) -> None:
        self.grid, self.config, self.timeout, self.progress = grid, run_config, timeout, progress
        self.threshold = threshold
        self.quantizer = Quantizer(clip)
        self.server: SecAggServer | None = None
        self.participants: list[int] = []

    def _query(
        self, requests: Mapping[int, Request], message_type: str, timeout: float | None = None
    ) -> list[tuple[int, Message]]:
        """Send each node its request; (node, reply) pairs, a SuperLink's reply for a lost node attributed."""
        sent = []
        for node, request in requests.items():
            content = RecordDict({protocol.CONFIG: ConfigRecord(self.config | request.to_config())})
            sent.append(Message(content, dst_node_id=node, message_type=message_type))
        replies = list(self.grid.send_and_receive(sent, timeout=timeout or self.timeout))
        return [(wire.reply_sender(reply, sent), reply) for reply in replies]

    def setup(self, nodes: list[int], run_id: int, arrays: ArrayRecord) -> list[int]:
        """Agree keys with ``nodes``; returns the nodes that completed setup."""
        t, k = graph_parameters(len(nodes), self.threshold)
        if len(nodes) < 2 or t > len(nodes):
            raise FedcareError(
                f"secure aggregation needs at least 2 hospitals and a threshold <= the hospital count "
                f"({len(nodes)} hospital(s), threshold {t})",
                "add hospitals, lower secagg-threshold (`fedcare simulate --secagg-threshold`, run-config "
                "secagg-threshold), or turn secure aggregation off (`fedcare simulate --no-secure-aggregation`, "
                "run-config secure-aggregation=false)",
            )
        self.quantizer.check_capacity(len(nodes))
        self.server = SecAggServer(run_id, t, k, nodes, vector_length(arrays))
        advertise = {n: messages.KeyAgreementRequest(t, k, list(nodes)) for n in nodes}
        for node, msg in self._ok(self._query(advertise, protocol.SECAGG_ADVERTISE), "key advertisement"):
            try:
                self.server.add_advertisement(node, _reply(msg, messages.AdvertiseReply).advertisement)
            except (SecAggError, KeyError) as exc:
                self.progress(f"secure aggregation: {_name(msg, node)}'s keys refused ({_problem(exc)})")
        ads = self.server.advertisements()
        for node, msg in self._ok(
            self._query({n: messages.ShareKeysRequest(dict(ads)) for n in ads}, protocol.SECAGG_SHARE_KEYS),
            "key sharing",
        ):
            try:
                self.server.add_setup(node, _reply(msg, messages.ShareKeysReply).setup)
            except (SecAggError, KeyError) as exc:
                self.progress(f"secure aggregation: {_name(msg, node)}'s key shares refused ({_problem(exc)})")
        self.participants = sorted(ads)
        graph = "every hospital" if k + 1 >= len(ads) else f"{k} neighbours each (SecAgg+)"
        self.progress(f"secure aggregation: keys agreed with {len(ads)} hospitals, threshold {t}, shares with {graph}")
        return sorted(ads)

    def _ok(self, replies: Iterable[tuple[int, Message]], stage: str) -> list[tuple[int, Message]]:
        good = []
        for node, msg in replies:
            refusal = None if msg.has_error() else wire.Refusal.from_content(msg.content)
            if msg.has_error() or refusal is not None:
                why = msg.error.reason if refusal is None else refusal.reason
                self.progress(f"secure aggregation {stage}: {_name(msg, node)} dropped ({_first_line(why)})")
                continue
            good.append((node, msg))
        return good

    def audit_summary(self, outcome: SecureRoundOutcome | None = None) -> dict:
        """What the audit log records about this round's secure aggregation."""
        assert self.server is not None
        summary = {
            "threshold": self.server.threshold,
            "neighbours": self.server.neighbours,
            "survivors": sorted(outcome.survivors) if outcome else [],
        }
        if outcome is not None:
            summary |= {
                "path": outcome.path,
                "dropped": sorted(outcome.dropped),
                "silent": sorted(outcome.silent),
                "failed": {str(n): r for n, r in outcome.failed.items()},
            }
        return summary

    def attach_requests(self, rnd: int, train_messages: list[Message]) -> list[Message]:
        """Open round ``rnd`` and put each active node's mask request into its train message.

        Nodes that are out of the run (dropped earlier, or named for misbehaving) get no message.
        Raises ``TooFewSurvivors`` when fewer than the threshold can still mask.
        """
        assert self.server is not None
        requests = self.server.start_round(rnd)
        kept = []
        for msg in train_messages:
            request = requests.get(msg.metadata.dst_node_id)
            if request is not None:
                # Flower's strategies give every train message the same RecordDict: copy, then add.
                mask = messages.MaskRequest(request["round"], request["peers"])
                config = dict(msg.content[protocol.CONFIG]) | mask.to_config()
                msg.content = RecordDict({**dict(msg.content.items()), protocol.CONFIG: ConfigRecord(config)})
                kept.append(msg)
        return kept

    def aggregate(
        self, rnd: int, replies: list[Message], arrays: ArrayRecord, failed: dict[str, str], names: dict[int, str]
    ) -> tuple[list[Message], SecureRoundOutcome]:
        """The round's replies reduced to one carrying only the weighted mean model and total weight.

        That one message goes to the Flower strategy's ``aggregate_train`` (FedAvg, FedProx and
        FedAdam then work unchanged); an empty list means the round failed and the model stays.
        Every hospital named in the outcome is in ``failed`` with the reason.
        """
        outcome = self.finish_round(rnd, replies, arrays)
        for node, why in outcome.failed.items():
            failed[names.get(node, f"node {node}")] = why
            self.progress(f"round {rnd}: {names.get(node, f'node {node}')} {why}")
        for node in outcome.silent:
            self.progress(
                f"round {rnd}: {names.get(node, f'node {node}')} did not answer the unmask exchange "
                "(its update was still summed)"
            )
        if outcome.mean_arrays is None:
            failed["secure aggregation"] = outcome.reason or "failed"
            self.progress(outcome.reason or f"round {rnd}: secure aggregation failed")
            return [], outcome
        carrier = next(m for m in replies if m.metadata.src_node_id in outcome.survivors)
        carrier.content = RecordDict(
            {
                protocol.ARRAYS: outcome.mean_arrays,
                protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: float(outcome.total_weight)}),
            }
        )
        return [carrier], outcome

    def finish_round(self, rnd: int, replies: list[Message], arrays: ArrayRecord) -> SecureRoundOutcome:
        """Sum the masked replies, unmask with the survivors, return the weighted mean model."""
        server = self.server
        assert server is not None
        outcome = SecureRoundOutcome(None)
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                update = _reply(msg, messages.MaskedUpdate)
                server.add_masked(node, {**update.statement, "masked": update.masked})
            except (SecAggError, KeyError, TypeError, ValueError) as exc:
                outcome.failed[node] = f"masked update rejected: {_problem(exc)}"
        try:
            revealed = self._unmask_exchanges(rnd, outcome)
            total, found = server.finish(revealed)
        except (TooFewSurvivors, SecAggError) as exc:
            blame = [n for n in getattr(exc, "blame", [])]
            server.abort_round(blame)
            outcome.reason = f"round {rnd} failed, model unchanged: {_problem(exc)}"
            return outcome
        outcome.survivors, outcome.dropped, outcome.silent = found.survivors, found.dropped, found.silent
        outcome.failed |= found.blamed
        mean_delta, outcome.total_weight = self.quantizer.decode_mean(total, len(outcome.survivors))
        outcome.mean_arrays = apply_delta(arrays, mean_delta)
        return outcome

    def _unmask_exchanges(self, rnd: int, outcome: SecureRoundOutcome) -> dict[int, dict]:
        """The fast path's one exchange, or the consistency path's two; the survivors' unmask replies."""
        server = self.server
        assert server is not None
        if server.fast_path():
            outcome.path = "fast"
            requests = {n: _unmask_request(r, "fast") for n, r in server.unmask_fast_requests().items()}
        else:
            outcome.path = "consistency"
            views = {n: messages.ViewRequest(r["round"], r["survivors"]) for n, r in server.view_requests().items()}
            for node, msg in self._ok(self._query(views, protocol.SECAGG_VIEW), f"view (round {rnd})"):
                try:
                    server.add_view_signature(node, _reply(msg, messages.ViewReply).sig)
                except (SecAggError, KeyError) as exc:
                    outcome.failed[node] = f"sent a malformed view signature ({_problem(exc)})"
            requests = {n: _unmask_request(r, "consistency") for n, r in server.unmask_requests().items()}
        revealed = {}
        for node, msg in self._ok(self._query(requests, protocol.SECAGG_UNMASK), f"unmask (round {rnd})"):
            try:
                revealed[node] = _reply(msg, messages.UnmaskReply).revealed()
            except (SecAggError, KeyError) as exc:
                outcome.failed[node] = f"sent a malformed unmask reply ({_problem(exc)})"
        return revealed

    def end(self) -> None:
        """The run is over (finished or failed): every participant deletes its private key material."""
        if self.server is None or not self.participants:
            return
        try:
            end = messages.EndRequest()
            self._query({n: end for n in self.participants}, protocol.SECAGG_END, timeout=END_TIMEOUT_S)
        except Exception as exc:  # best effort: nodes also expire abandoned keys themselves
            self.progress(f"secure aggregation: could not tell every hospital the run ended ({exc})")


def apply_delta(arrays: ArrayRecord, delta: np.ndarray) -> ArrayRecord:
    """global + delta, where ``delta`` is the concatenation of every array's flattened change."""
    out, start = {}, 0
    for name, array in arrays.items():
        current = array.numpy()
        size = current.size
        out[name] = Array((current + delta[start : start + size].reshape(current.shape)).astype(current.dtype))
        start += size
    return ArrayRecord(out)


def _reply(msg: Message, kind: type[Reply]) -> Reply:
    """A node's typed reply, from the ``secagg/`` keys of its hospital record (a malformed one is named)."""
    return kind.from_config(dict(msg.content.config_records.get(protocol.HOSPITAL, {})))


def _unmask_request(request: Mapping[str, Any], path: str) -> messages.UnmaskRequest:
    """The server half's unmask request for one node, typed, on ``path`` (fast or consistency)."""
    return messages.UnmaskRequest(
        round=request["round"],
        path=path,
        b_share_ciphertexts=request["b_share_ciphertexts"],
        statements=request["statements"],
        survivors=list(request.get("survivors", [])),
        signatures=dict(request.get("signatures", {})),
    )


def _name(msg: Message, node: int) -> str:
    name = wire.hospital_name(msg.content) if msg.has_content() else None
    return name or f"node {node}"


def _problem(exc: BaseException) -> str:
    return getattr(exc, "problem", None) or str(exc)


def _first_line(text: str | None) -> str:
    return (text or "no reason").splitlines()[0]
