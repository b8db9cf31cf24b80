"""The coordinator's round loop: statistics round, then train/evaluate rounds.

Uses Flower's Message-API strategies for sampling and aggregation, and adds what a hospital
federation needs around them: hospitals that refuse (privacy budget, bad data) are reported by
name and left out; the run stops cleanly when fewer than ``min-hospitals`` can still train;
every round is evaluated per hospital and pooled from confusion matrices and score histograms.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcare import protocol, timing, wire
from fedcare.errors import BudgetExhausted, FedcareError
from fedcare.run_config import RunSettings
from server.feature_statistics import HospitalSums, Normalisation, pooled_normalisation
from server.strategies import build_strategy
from shared_models.classification_metrics import BinarySummary
from shared_models.registry import build_model, resolve_model
from shared_models.weights import model_to_arrays, pack_arrays

Progress = Callable[[str], None]

# How long one exchange (statistics, train, unmask, evaluate) waits for replies. Deployed
# hospitals answer in parallel; a simulation runs them in waves on its workers and scales this
# (see ``simulation.runner.exchange_timeout``).
EXCHANGE_TIMEOUT = 600.0


@dataclass
class Hospital:
    node_id: int
    name: str
    active: bool = True
    refusal: str | None = None
    refusal_kind: str | None = None  # "budget" or "data", as the hospital said
    epsilon: float | None = None
    weight: float | None = None
    delta: float | None = None  # the delta this hospital accounts at (its own policy's)
    private_noise: bool = True  # False: its noise was reproducible (a simulation's benchmark switch)

    def note_privacy(self, note: wire.PrivacyNote) -> None:
        """Take the hospital's own statement about its release (its delta; reproducible noise)."""
        if note.delta is not None:
            self.delta = note.delta
        if not note.private_noise:
            self.private_noise = False


@dataclass
class RoundRecord:
    round: int
    seconds: float
    trained: list[str]
    refused: dict[str, str]
    failed: dict[str, str]
    epsilon: dict[str, float]
    evaluation: dict[str, dict[str, float]]  # hospital name (and "pooled") -> metrics
    train_loss: float | None = None
    train_seconds: dict[str, float] = field(default_factory=dict)  # hospital -> local training wall time
    asked: int = 0  # hospitals sent a train message
    # secure aggregation: "path" (fast / consistency), "dropped" and "silent" (no unmask reply) hospitals
    secagg: dict[str, Any] = field(default_factory=dict)


@dataclass
class FederationResult:
    arrays: ArrayRecord
    normalisation: Normalisation
    hospitals: dict[int, Hospital]
    rounds: list[RoundRecord] = field(default_factory=list)
    stopped_early: str | None = None  # why the run did not do all its planned rounds (None: it did)
    final_summaries: dict[str, BinarySummary] = field(default_factory=dict)
    # each hospital's test of its personalised model (the final model fine-tuned locally), when released
    personalised: dict[str, BinarySummary] = field(default_factory=dict)
    # What a coordinator crash cost, as the hospitals reported it when the run resumed:
    # {"lost_rounds": {round: [hospitals that paid for it]}, "noise": {hospital: {"planned", "now", "from_round"}}}
    crash_cost: dict[str, Any] = field(default_factory=dict)
    min_hospitals: int = 1

    @property
    def rounds_done(self) -> int:
        """Rounds whose model at least ``min_hospitals`` hospitals trained."""
        return sum(1 for r in self.rounds if len(r.trained) >= self.min_hospitals)

    @property
    def status(self) -> str:
        """``completed`` when every planned round was trained by enough hospitals, else ``incomplete``."""
        return "completed" if self.stopped_early is None else "incomplete"


def training_config(s: RunSettings) -> dict[str, Any]:
    """What every node needs to know about this run (sent in each message): a ``RunRequest``."""
    import dataclasses as dc

    from fedcare.protocol import RunRequest

    values = {f.name: getattr(s, f.name) for f in dc.fields(RunRequest) if hasattr(s, f.name)}
    values["proximal_mu"] = s.proximal_mu if s.strategy == "fedprox" else 0.0
    return RunRequest(**values).to_config()


class PromptGrid:
    """A Grid whose ``send_and_receive`` polls for replies within 50-250 ms (10 ms in a simulation), not every 3 s.

    Flower 1.41's deployment Grid sleeps a fixed 3 s between pulls (``GrpcGrid``/``HttpGrid``), so
    every exchange (statistics, key agreement, train, unmask, evaluate) waits up to 3 s after its
    last reply arrived. This wrapper does the same push-then-pull with Flower's public
    ``push_messages``/``pull_messages``, polling soon after the push and backing off to 250 ms.
    Polling promptly means often meeting a reply whose objects are still being uploaded, which
    Flower retries after 1 s: that backoff is shortened too (``fedcare.compat.flower``).
    Everything else is the wrapped Grid's. ``FEDCARE_FLOWER_POLLING=1`` keeps Flower's own loop
    and backoff (for before/after measurements).
    """

    FIRST_POLL_S, MAX_POLL_S = 0.05, 0.25
    # The Simulation Engine's grid reads an in-process table: a pull costs microseconds, not a
    # request to the SuperLink, so it is polled every 10 ms (a backed-off poll there cost every
    # exchange up to 0.25 s after its last reply).
    IN_PROCESS_POLL_S = 0.01

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._first_poll, self._max_poll = self.FIRST_POLL_S, self.MAX_POLL_S
        if _in_process(grid):
            self._first_poll = self._max_poll = self.IN_PROCESS_POLL_S
        self._flower = os.environ.get("FEDCARE_FLOWER_POLLING") == "1"
        if not self._flower:
            from fedcare.compat.flower import shorten_object_pull_backoff

            shorten_object_pull_backoff()

    @classmethod
    def wrap(cls, grid: Any) -> Any:
        """``grid`` wrapped, when it is a Flower Grid (a stand-in with only send_and_receive is kept)."""
        has_api = all(callable(getattr(grid, m, None)) for m in ("push_messages", "pull_messages"))
        return cls(grid) if has_api and not isinstance(grid, cls) else grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        kinds = sorted({m.metadata.message_type for m in messages})
        timing.trace("server-push", type=",".join(kinds), round=_group(messages), n=len(messages))
        if self._flower:
            replies: list[Message] = list(self._grid.send_and_receive(messages, timeout=timeout))
            _trace_replies(replies)
            return replies
        waiting = set(self._grid.push_messages(messages))
        del messages
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies = []
        delay = self._first_poll
        while timeout is None or time.time() < end:
            got = list(self._grid.pull_messages(waiting))
            _trace_replies(got)
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            time.sleep(delay)
            delay = min(self._max_poll, delay * 1.5)
        return replies


def _group(messages: list[Message]) -> str:
    return messages[0].metadata.group_id if messages else ""


def _trace_replies(replies: list[Message]) -> None:
    if timing.enabled():
        for m in replies:
            timing.trace(
                "server-reply", type=m.metadata.message_type, round=m.metadata.group_id, node=m.metadata.src_node_id
            )


def _wait_for_nodes(grid: Grid, expected: int, timeout: float, progress: Progress) -> list[int]:
    deadline = time.monotonic() + timeout
    announced = False
    while len(nodes := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FedcareError(
                f"only {len(nodes)} of {expected} hospitals connected within {timeout:.0f} s",
                "start the missing SuperNodes or lower the expected hospital count",
            )
        if not announced:
            progress(f"waiting for {expected} hospitals ({len(nodes)} connected)")
            announced = True
        time.sleep(0.5)
    return sorted(nodes)


def _name(msg: Message) -> str:
    return wire.hospital_name(msg.content) or f"node {msg.metadata.src_node_id}"


def _refusal(msg: Message) -> wire.Refusal | None:
    return None if msg.has_error() else wire.Refusal.from_content(msg.content)


def _refuse(hospital: Hospital, refusal: wire.Refusal) -> None:
    hospital.active, hospital.refusal, hospital.refusal_kind = False, refusal.reason, refusal.kind


def _statistics_round(
    grid: Grid,
    nodes: list[int],
    config: dict[str, Any],
    hospitals: dict[int, Hospital],
    timeout: float,
    progress: Progress,
) -> tuple[Normalisation, tuple[int, ...], str]:
    """The statistics phase: every hospital's (noisy) feature sums, pooled into the normalisation."""
    messages = [
        Message(RecordDict({protocol.CONFIG: ConfigRecord(config)}), dst_node_id=n, message_type=protocol.FEATURE_STATS)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sums, schema = [], None
    answered = set()
    for msg in replies:
        node = wire.reply_sender(msg, messages)
        answered.add(node)
        if msg.has_error():
            hospitals[node] = Hospital(node, f"node {node}", active=False, refusal=f"failed: {msg.error.reason}")
            progress(
                f"statistics: node {node} failed ({msg.error.reason.splitlines()[0] if msg.error.reason else 'no reason'})"
            )
            continue
        name = _name(msg)
        hospital = hospitals.setdefault(node, Hospital(node, name))
        hospital.name = name
        if (refusal := _refusal(msg)) is not None:
            _refuse(hospital, refusal)
            progress(f"statistics: {refusal.reason}")
            continue
        reply = wire.StatsReply.decode(msg.content)
        if schema is None:
            schema = reply.schema
        elif reply.schema != schema:
            raise FedcareError(
                f"{name} describes its features differently from the other hospitals",
                "every hospital must use the same dataset schema and version",
            )
        hospital.weight = reply.num_examples
        hospital.note_privacy(reply.privacy)
        sums.append(HospitalSums(hospital.weight, reply.sums, reply.second, reply.observed, reply.noise_std))
        if reply.epsilon is not None:
            hospital.epsilon = reply.epsilon
    for node in set(nodes) - answered:
        hospitals[node] = Hospital(node, f"node {node}", active=False, refusal="no reply to the statistics round")
    if schema is None:
        _nobody_can_take_part(hospitals)
    bounds = list(zip(schema.bounds_lo, schema.bounds_hi))
    return pooled_normalisation(list(schema.names), bounds, sums), schema.input_shape, schema.task


def _nobody_can_take_part(hospitals: dict[int, Hospital]) -> NoReturn:
    """Stop the run: every hospital refused, failed or was silent in the statistics round."""
    reasons = "; ".join(h.refusal or "" for h in hospitals.values())
    if all(h.refusal_kind == "budget" for h in hospitals.values()):
        raise BudgetExhausted(
            f"no hospital can take part: {reasons}", "every hospital has spent its privacy budget on this data"
        )
    raise FedcareError(f"no hospital can take part: {reasons}")


def _in_process(grid: Any) -> bool:
    """Whether ``grid`` is the Simulation Engine's in-memory grid (no network between it and its state)."""
    module = sys.modules.get("flwr.superlink.grid.inmemory_grid")  # never loaded outside a simulation
    return module is not None and isinstance(grid, module.InMemoryGrid)


def run_federation(
    grid: Grid,
    s: RunSettings,
    expected_hospitals: int,
    progress: Progress,
    timeout: float = EXCHANGE_TIMEOUT,
    run_id: int = 0,
) -> FederationResult:
    """Run the whole federation and return the final model and per-round records.

    Phases, in order: statistics (with resume and the initial model), key agreement (secure
    aggregation only), then per round train (which also evaluates the previous round's model) and
    unmask, then evaluate the last model, and finish (why the run stopped short, if it did).
    """
    run = _Federation(PromptGrid.wrap(grid), s, progress, timeout, run_id)
    run.statistics(_wait_for_nodes(run.grid, expected_hospitals, timeout, progress))
    result = run.start()
    if result.stopped_early is not None:
        return result
    run.key_agreement()
    try:
        stop_message = None
        for rnd in range(run.first_round, s.num_rounds + 1):
            if (stop_message := run.train_round(rnd)) is not None:
                break
        run.evaluate_last()
        run.finish(stop_message)
        return result
    finally:
        run.end_key_material()


class _Federation:
    """One run's state, and one method per phase of ``run_federation``."""

    def __init__(self, grid: Any, s: RunSettings, progress: Progress, timeout: float, run_id: int) -> None:
        self.grid, self.s, self.progress, self.timeout, self.run_id = grid, s, progress, timeout, run_id
        self.config = training_config(s)
        self.hospitals: dict[int, Hospital] = {}
        self.secure: Any = None
        self.first_round = 1
        self.unevaluated: RoundRecord | None = None

    # ---- statistics ------------------------------------------------------------------------------
    def statistics(self, nodes: list[int]) -> None:
        """Resume (if asked), the statistics round, the normalisation, the initial model and strategy."""
        import torch

        from server.checkpoint import (
            check_compatible,
            load_checkpoint,
            restore_strategy,
        )

        s, resumed = self.s, None
        if s.resume:
            resumed = load_checkpoint(s.output_dir)
            check_compatible(resumed, s.to_config())
            self.progress(f"resuming run {resumed.plan_run_id} after round {resumed.completed_round} of {s.num_rounds}")
        self.resumed = resumed
        self.plan_run_id = resumed.plan_run_id if resumed else str(self.run_id)
        # hospitals keep that run's privacy plan (same noise, no recount)
        self.config["plan-run-id"] = self.plan_run_id
        normalisation, input_shape, task = _statistics_round(
            self.grid, nodes, self.config, self.hospitals, self.timeout, self.progress
        )
        if resumed is not None:
            normalisation = Normalisation(**resumed.normalisation)
        self.normalisation = normalisation
        self.active = [h for h in self.hospitals.values() if h.active]
        self.progress(
            f"statistics round: {len(self.active)} of {len(nodes)} hospitals, "
            f"~{normalisation.pooled_count:.0f} training patients (to a batch)"
        )
        self.inputs = wire.ModelInputs(normalisation.mean, normalisation.std)
        self.config |= self.inputs.to_config()
        with torch.random.fork_rng(devices=[]):  # the run seed sets the initial model only, nothing after it
            torch.manual_seed(s.seed)
            self.arrays = model_to_arrays(build_model(resolve_model(s.model, task), input_shape, s.hidden_units))
        self.strategy = build_strategy(s)
        if resumed is not None:
            self.arrays, self.first_round = resumed.arrays, resumed.completed_round + 1
            restore_strategy(self.strategy, resumed.strategy_state)

    def start(self) -> FederationResult:
        """The result the rounds fill in, and the audit log's start record; stopped early when too few
        hospitals can train."""
        from server import audit_trail

        s, resumed = self.s, self.resumed
        result = self.result = FederationResult(
            self.arrays, self.normalisation, self.hospitals, min_hospitals=s.min_hospitals
        )
        if resumed is not None:
            result.rounds = [RoundRecord(**r) for r in resumed.rounds]
            result.crash_cost = dict(resumed.crash_cost)
        self.audit = audit_trail.open_log(s.output_dir)
        audit_trail.run_started(
            self.audit,
            self.run_id,
            s.to_config() | {"resumed-from": resumed.plan_run_id if resumed else None},
            self.arrays,
        )
        if len(self.active) < s.min_hospitals:
            result.stopped_early = (
                f"only {len(self.active)} hospital(s) can train (min-hospitals={s.min_hospitals}); no round was run"
            )
            self.progress(result.stopped_early)
        # A round's global model is evaluated in the next round's train exchange (each hospital tests the
        # model it receives before training on it), so a round costs one exchange fewer; hospitals that do
        # not train next round get an evaluation message in that same exchange. The last model gets its own.
        self.unevaluated = _unevaluated(result.rounds)
        return result

    # ---- key agreement ---------------------------------------------------------------------------
    def key_agreement(self) -> None:
        """Secure aggregation's setup: hospitals that drop out of it cannot train in this run."""
        if not self.s.secure_aggregation:
            return
        from server.secure_rounds import SecureAggregation

        s = self.s
        self.secure = SecureAggregation(
            self.grid, dict(self.config), s.secagg_threshold, s.secagg_clip_range, self.timeout, self.progress
        )
        keyed = set(self.secure.setup([h.node_id for h in self.active], self.run_id, self.arrays))
        for h in self.active:
            if h.node_id not in keyed:
                h.active, h.refusal = False, "dropped out during secure-aggregation key agreement"

    # ---- train (with the previous round's evaluation) ---------------------------------------------
    def train_round(self, rnd: int) -> str | None:
        """One round: train (and evaluate the previous model), unmask, aggregate, record. Returns why the
        run stops after it (None: it goes on)."""
        t0 = time.monotonic()
        record = RoundRecord(rnd, 0.0, [], {}, {}, {}, {})
        messages = self._train_messages(rnd)
        if self.secure is not None:
            try:
                messages = self.secure.attach_requests(rnd, messages)
            except FedcareError as exc:
                return f"stopped before round {rnd}: {exc.problem}"
        evaluators, eval_only = self._evaluation_alongside(messages)
        sent = messages + eval_only
        replies = list(self.grid.send_and_receive(_model_packed(sent), timeout=self.timeout))
        summaries: dict[str, BinarySummary] = {}
        valid = self._take_train_replies(rnd, record, replies, sent, evaluators, eval_only, summaries)
        missing = {m.metadata.dst_node_id for m in messages} - {wire.reply_sender(r, messages) for r in replies}
        for node in missing:
            record.failed[self.hospitals[node].name] = "no reply before the timeout"
        received = {
            self.hospitals[m.metadata.src_node_id].name: wire.plain_update(m.content)
            for m in valid
            if self.secure is None
        }
        valid, secure_outcome = self._unmask(rnd, record, valid)
        self._aggregate(rnd, record, valid)
        if self.unevaluated is not None:
            _record_evaluation(self.unevaluated, summaries, self.result)
            self.progress(_progress_line(self.unevaluated, self.s.num_rounds))
        if (cost := _crash_cost_line(self.result.crash_cost, rnd)) is not None:
            self.progress(cost)
        record.asked = len(messages)
        record.seconds = time.monotonic() - t0
        timing.trace("server-round", round=rnd, seconds=record.seconds)
        self.result.rounds.append(record)
        self.unevaluated = record
        self._save(rnd)
        self._audit_round(rnd, record, messages, received, secure_outcome)
        still = sum(1 for h in self.hospitals.values() if h.active)
        if still < self.s.min_hospitals and rnd < self.s.num_rounds:
            return (
                f"stopped after round {rnd}: only {still} hospital(s) can still train "
                f"(min-hospitals={self.s.min_hospitals})"
            )
        return None

    def _train_messages(self, rnd: int) -> list[Message]:
        inputs = dataclasses.replace(self.inputs, evaluate_incoming=self.unevaluated is not None)
        train_config = dict(self.config) | inputs.to_config()
        return [
            m
            for m in self.strategy.configure_train(rnd, self.arrays, ConfigRecord(train_config), self.grid)
            if self.hospitals.get(m.metadata.dst_node_id, Hospital(0, "")).active
        ]

    def _evaluation_alongside(self, messages: list[Message]) -> tuple[set[int], list[Message]]:
        """Who tests the previous round's model in this exchange, and the evaluate messages for those of
        them that do not train this round."""
        if self.unevaluated is None:
            return set(), []
        eval_messages = _evaluation_messages(self.strategy, self.unevaluated.round, self.arrays, self.config, self.grid)
        training = {m.metadata.dst_node_id for m in messages}
        return (
            {m.metadata.dst_node_id for m in eval_messages},
            [m for m in eval_messages if m.metadata.dst_node_id not in training],
        )

    def _take_train_replies(
        self,
        rnd: int,
        record: RoundRecord,
        replies: list[Message],
        sent: list[Message],
        evaluators: set[int],
        eval_only: list[Message],
        summaries: dict[str, BinarySummary],
    ) -> list[Message]:
        """Evaluations, refusals, failures and reports from one train exchange; the replies to aggregate."""
        evaluating_only = {m.metadata.dst_node_id for m in eval_only}
        valid = []
        for msg in replies:
            node = wire.reply_sender(msg, sent)
            if not msg.has_error() and node in evaluators:
                _collect_evaluation(msg, summaries)
            if node in evaluating_only:
                continue
            hospital = self.hospitals[node]
            if msg.has_error():
                record.failed[hospital.name] = cast(str, msg.error.reason)  # an error message names its reason
                continue
            if (refusal := _refusal(msg)) is not None:
                _refuse(hospital, refusal)
                record.refused[hospital.name] = refusal.reason
                self.progress(f"round {rnd}: {refusal.reason}")
                continue
            report = wire.TrainReport.from_record(msg.content.config_records.get(protocol.HOSPITAL, {}))
            hospital.note_privacy(report.privacy)
            if report.epsilon is not None:
                hospital.epsilon = report.epsilon
                record.epsilon[hospital.name] = hospital.epsilon
            if report.train_seconds is not None:
                record.train_seconds[hospital.name] = report.train_seconds
            _note_replan(self.result.crash_cost, hospital.name, report)
            record.trained.append(hospital.name)
            valid.append(msg)
        return valid

    # ---- unmask ----------------------------------------------------------------------------------
    def _unmask(self, rnd: int, record: RoundRecord, valid: list[Message]) -> tuple[list[Message], Any]:
        """Secure aggregation's unmask exchange; hospitals that misbehaved or dropped are out for the run."""
        if not valid or self.secure is None:
            return valid, None
        hospitals = self.hospitals
        valid, outcome = self.secure.aggregate(
            rnd, valid, self.arrays, record.failed, {n: h.name for n, h in hospitals.items()}
        )
        for node in outcome.failed:  # named for misbehaving: out for the rest of the run
            if node in hospitals:
                hospitals[node].active, hospitals[node].refusal = False, outcome.failed[node]
        for node in outcome.dropped:  # its round key was revealed: it cannot rejoin this run
            if node in hospitals and hospitals[node].active:
                hospitals[node].active = False
                hospitals[node].refusal = f"dropped out during secure aggregation in round {rnd}"
        named = {n: h.name for n, h in hospitals.items()}
        record.secagg = {
            "path": outcome.path,
            "dropped": [named.get(n, f"node {n}") for n in outcome.dropped],
            "silent": [named.get(n, f"node {n}") for n in outcome.silent],
        }
        record.trained = [name for name in record.trained if name not in record.failed]
        return valid, outcome

    def _aggregate(self, rnd: int, record: RoundRecord, valid: list[Message]) -> None:
        if valid:
            new_arrays, train_metrics = self.strategy.aggregate_train(rnd, valid)
            if new_arrays is not None:
                self.arrays = new_arrays
            record.train_loss = wire.aggregated_train_loss(train_metrics)
        self.result.arrays = self.arrays

    def _save(self, rounds_done: int) -> None:
        from server.checkpoint import Checkpoint, save_checkpoint, strategy_state

        s, result = self.s, self.result
        save_checkpoint(
            s.output_dir,
            Checkpoint(
                rounds_done,
                self.plan_run_id,
                s.to_config(),
                dataclasses.asdict(self.normalisation),
                [dataclasses.asdict(r) for r in result.rounds],
                self.arrays,
                strategy_state(self.strategy),
                result.crash_cost,
            ),
        )

    def _audit_round(
        self, rnd: int, record: RoundRecord, messages: list[Message], received: dict[str, Any], secure_outcome: Any
    ) -> None:
        from server import audit_trail
        from server.checkpoint import checkpoint_digest

        audit_trail.round_done(
            self.audit,
            run_id=self.run_id,
            round_=rnd,
            strategy=self.s.strategy,
            sampled=[self.hospitals[m.metadata.dst_node_id].name for m in messages],
            responded=record.trained,
            failed=record.failed,
            refused=record.refused,
            arrays=self.arrays,
            secagg=self.secure.audit_summary(secure_outcome) if self.secure is not None else None,
            received=received,
            checkpoint=checkpoint_digest(self.s.output_dir),
        )

    # ---- evaluate --------------------------------------------------------------------------------
    def evaluate_last(self) -> None:
        """The last trained model has not been tested in a train exchange: its own evaluate exchange."""
        if self.unevaluated is None:
            return
        summaries: dict[str, BinarySummary] = {}
        config = self.config | dataclasses.replace(self.inputs, personalise=self.s.personalise_rounds > 0).to_config()
        messages = _evaluation_messages(self.strategy, self.unevaluated.round, self.arrays, config, self.grid)
        for msg in self.grid.send_and_receive(_model_packed(messages), timeout=self.timeout):
            if not msg.has_error():
                _collect_evaluation(msg, summaries)
                self._take_personalised(msg)
        _record_evaluation(self.unevaluated, summaries, self.result)
        self.progress(_progress_line(self.unevaluated, self.s.num_rounds))
        self._save(self.unevaluated.round)

    def _take_personalised(self, msg: Message) -> None:
        """A final evaluate reply's personalised test, and the hospital's epsilon after personalising."""
        if (personalised := wire.EvaluationMetrics.personalised_in(msg.content)) is not None:
            self.result.personalised[_name(msg)] = personalised.summary()
        epsilon = wire.personalised_epsilon(msg.content)
        hospital = self.hospitals.get(msg.metadata.src_node_id)
        if epsilon is not None and hospital is not None:
            hospital.epsilon = epsilon

    # ---- finish ----------------------------------------------------------------------------------
    def finish(self, stop_message: str | None) -> None:
        """Say why the run did not do all its rounds, if it did not."""
        if stop_message is None:
            stop_message = _short_rounds(self.result, self.s)
        if stop_message is not None:
            self.result.stopped_early = stop_message
            self.progress(stop_message)

    def end_key_material(self) -> None:
        """Finished or failed: every secure-aggregation participant deletes its private keys."""
        if self.secure is not None:
            self.secure.end()


def _note_replan(cost: dict[str, Any], hospital: str, report: wire.TrainReport) -> None:
    """Add a hospital's statement that it re-planned its noise (and which charged rounds were lost)."""
    if report.planned_noise_multiplier is None:
        return
    cost.setdefault("noise", {})[hospital] = {
        "planned": report.planned_noise_multiplier,
        "now": report.noise_multiplier,
        "from_round": report.replanned_from_round,
    }
    for lost in report.lost_rounds:
        names = cost.setdefault("lost_rounds", {}).setdefault(str(lost), [])
        if hospital not in names:
            names.append(hospital)
            names.sort()


def _crash_cost_line(cost: dict[str, Any], rnd: int) -> str | None:
    """What a crash cost, said once, in the round the hospitals re-planned (None in any other round)."""
    replanned = {name: n for name, n in cost.get("noise", {}).items() if n["from_round"] == rnd}
    if not replanned:
        return None
    lost = {r: names for r, names in cost.get("lost_rounds", {}).items() if set(names) & set(replanned)}
    charged = "; ".join(
        f"round {r} was charged at {len(names)} hospital{'s' if len(names) != 1 else ''} "
        f"({', '.join(names)}) but its update was lost in the crash"
        for r, names in sorted(lost.items(), key=lambda kv: int(kv[0]))
    )
    noise = ", ".join(f"{n['now']:.4g} instead of {n['planned']:.4g} ({name})" for name, n in sorted(replanned.items()))
    why = charged or f"round {rnd}: hospitals re-planned their noise to stay within their planned epsilon"
    return f"{why}; the remaining rounds use noise multiplier {noise}"


def _short_rounds(result: FederationResult, s: RunSettings) -> str | None:
    """Why a run that went through all its rounds still did not do them all (None: it did).

    A round that fewer than ``min-hospitals`` hospitals trained (all refused, e.g. their budget
    ran out, or failed) left the model as it was: the run must not look as if it went well.
    """
    short = [r for r in result.rounds if len(r.trained) < s.min_hospitals]
    if not short:
        return None
    reasons = []
    for r in short:
        why = [f"{name}: {reason}" for name, reason in {**r.refused, **r.failed}.items()]
        reasons.append(
            f"round {r.round} trained by {len(r.trained)} of {r.asked} hospital(s)"
            + (f" ({'; '.join(why)})" if why else "")
        )
    last_trained = max((r.round for r in result.rounds if len(r.trained) >= s.min_hospitals), default=0)
    model = f"the final model is round {last_trained}'s" if last_trained else "the final model is the initial one"
    return f"{result.rounds_done} of {s.num_rounds} planned rounds done; {'; '.join(reasons)}; {model}"


def _unevaluated(rounds: list[RoundRecord]) -> RoundRecord | None:
    """The last round if its model has not been evaluated yet (e.g. a checkpoint taken before that)."""
    return rounds[-1] if rounds and not rounds[-1].evaluation else None


def _evaluation_messages(
    strategy: Any, rnd: int, arrays: ArrayRecord, config: dict[str, Any], grid: Grid
) -> list[Message]:
    return list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), grid))


def _model_packed(messages: list[Message]) -> list[Message]:
    """``messages`` with the model they carry as one packed ConfigRecord instead of an ArrayRecord.

    In a deployment every record, array and array chunk is a request at the SuperLink for the
    ServerApp and for each node; packed, the model is one object, shared by all nodes' messages.
    """
    packed: dict[int, ConfigRecord] = {}
    for msg in messages:
        arrays = msg.content.array_records.get(protocol.ARRAYS)
        if arrays is None:
            continue
        if id(arrays) not in packed:
            packed[id(arrays)] = pack_arrays(arrays)
        rest = {key: record for key, record in msg.content.items() if key != protocol.ARRAYS}
        msg.content = RecordDict({**rest, protocol.MODEL: packed[id(arrays)]})
    return messages


def _collect_evaluation(msg: Message, summaries: dict[str, BinarySummary]) -> None:
    """A hospital's test metrics of the model it received: an evaluate reply's metrics, or the
    evaluation record of a train reply (present even when the hospital then refused to train)."""
    evaluation = wire.EvaluationMetrics.in_train_reply(msg.content)
    if evaluation is None and msg.metadata.message_type == MessageType.EVALUATE and _refusal(msg) is None:
        evaluation = wire.EvaluationMetrics.in_evaluate_reply(msg.content)  # None: the hospital's policy withholds it
    if evaluation is not None:
        summaries[_name(msg)] = evaluation.summary()


def _record_evaluation(record: RoundRecord, summaries: dict[str, BinarySummary], result: FederationResult) -> None:
    if summaries:
        pooled = sum(summaries.values(), BinarySummary())
        record.evaluation = {name: sm.metrics() for name, sm in sorted(summaries.items())}
        record.evaluation["pooled"] = pooled.metrics()
        result.final_summaries = summaries


def _progress_line(r: RoundRecord, total: int) -> str:
    pooled = r.evaluation.get("pooled", {})
    parts = [f"round {r.round:>2}/{total}", f"hospitals {len(r.trained)}/{r.asked}"]
    if r.train_loss is not None:
        parts.append(f"train loss {r.train_loss:.3f}")
    if pooled:
        if "dice" in pooled:  # a segmentation test: Dice over lesion studies, AUC of lesion detection
            parts.append(f"pooled Dice {pooled['dice']:.3f} detection AUC {pooled['auc']:.3f}")
        else:
            parts.append(f"pooled acc {pooled['accuracy']:.3f} AUC {pooled['auc']:.3f} F1 {pooled['f1']:.3f}")
    if r.epsilon:
        parts.append(f"epsilon max {max(r.epsilon.values()):.3f}")
    if r.failed:
        parts.append("failed: " + ", ".join(sorted(r.failed)))
    parts.append(f"{r.seconds:.1f}s")
    return " | ".join(parts)
