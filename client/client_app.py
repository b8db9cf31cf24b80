"""The hospital's ClientApp: statistics, DP training and evaluation on local data.

Settings come from two places that never mix: the coordinator's message says what to train (a
``RunRequest``), and the node's own settings say which data, where the ledger is and what the
hospital accepts (its ``NodePolicy``: DP required, budget, delta, smallest federation and
threshold, widest clip range, what evaluation it releases). Every handler checks the request
against the policy before it touches the data; a request outside it is refused by name and reason.
Hospital-owned settings come from the node config only (in an in-process simulation, from the
defaults the simulation gives every virtual hospital), never from the run config or a message.

DP noise, Poisson sampling and statistics noise are drawn from the hospital's secret stream (OS
entropy, ``client/secret_randomness.py``), never from the run seed. Before every release the
privacy ledger is checked against the hospital's signed audit chain (``client/ledger_guard.py``).
Errors the hospital can fix, and refusals, are replied as a ``refusal`` record with a one-line
reason instead of a traceback, and written to the hospital's audit log.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.datasets import DataSource, HospitalData, hospital_name, load_hospital
from client.feature_stats import local_sums, released_arrays, stats_key
from client.node_config import DEFAULT_LEDGER_DIR, NodeConfig
from client.node_policy import NodePolicy, PolicyRefusal
from client.secret_randomness import SecretRandom
from fedcare import protocol, timing
from fedcare.errors import BudgetExhausted, FedcareError
from fedcare.protocol import RunRequest
from fedcare.run_config import personalise_lr_scale
from fedcare.wire import (
    EvaluationMetrics,
    FeatureSchema,
    ModelInputs,
    PrivacyNote,
    Refusal,
    StatsReply,
    TrainReport,
    asks_secure_update,
    evaluation_withheld,
    hospital_record,
    plain_train_reply,
    read,
    received_model,
)

if TYPE_CHECKING:
    from client.privacy_ledger import PrivacyLedger

# An in-process simulation (never a deployed node) may key every hospital's noise from this seed:
# reproducible for benchmarks and tests, and every release it makes is reported as not private.
REPRODUCIBLE_NOISE = "reproducible-noise-seed"
# An in-process simulation's virtual hospitals: the folder of the secret their identity keys derive from.
SIMULATED_CONSORTIUM = "simulated-consortium"

# Heavy imports (opacus via the privacy ledger, torch via the trainer and models) happen inside the
# handlers that need them: Flower runs every message in a fresh process, and importing opacus alone
# takes seconds, which secure-aggregation and evaluation messages do not need to pay.


@lru_cache(maxsize=16)
def _hospital(dataset: str, source: DataSource) -> HospitalData:
    return load_hospital(dataset, source)


class _Node:
    """What this node knows about itself, resolved for one message."""

    def __init__(self, context: Context, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
        self.context = context
        self.config = config
        self.defaults = defaults
        self.settings = NodeConfig.read(context.node_config, defaults, context.run_config)
        self.request = RunRequest.from_config(config)
        self.policy = _policy(context, defaults, self.request)
        self._name: str | None = None

    @property
    def dp(self) -> bool:
        return self.request.dp

    def rng(self, data: HospitalData, *label: object) -> SecretRandom:
        """A fresh secret stream for one release (OS entropy); seeded only in an in-process
        simulation that asked for reproducible noise (``REPRODUCIBLE_NOISE``, never node config)."""
        seed = self.defaults.get(REPRODUCIBLE_NOISE)
        hardened = self.policy.hardened_noise
        if seed is None:
            return SecretRandom(hardened=hardened)
        return SecretRandom.reproducible(int(seed), self.dataset_id(data), self.plan_id, *label, hardened=hardened)

    @property
    def private(self) -> bool:
        """False when this node's noise is reproducible (a simulation's benchmark switch)."""
        return self.defaults.get(REPRODUCIBLE_NOISE) is None

    def source(self) -> DataSource:
        """Where this hospital's data is: node config (run config only for a shared data root)."""
        return self.settings.data_source(self.request.image_size, self.request.task)

    def data(self, for_training: bool = True) -> HospitalData:
        data = _hospital(self.request.dataset, self.source())
        if for_training:
            data.check_trainable(self.request.batch_size, dp=self.request.dp)
        return data

    def dataset_id(self, data: HospitalData) -> str:
        """The identity this hospital's privacy ledger is kept under (hospital.toml ``dataset-id``)."""
        return self.settings.dataset_id or f"{self.request.dataset}:{data.name}"

    @property
    def ledger_dir(self) -> str:
        """The hospital's private state folder: privacy ledgers and secure-aggregation keys."""
        return self.settings.ledger_dir

    def secagg_state(self) -> Path:
        """This node's secure-aggregation state file for this run (private keys: hospital-side)."""
        from client.secure_update import state_file

        return state_file(self.ledger_dir, self.context.run_id, self.context.node_id)

    def name(self) -> str:
        """The hospital's name, without loading its data."""
        if self._name is None:
            self._name = hospital_name(self.request.dataset, self.source())
        return self._name

    def member_name(self) -> str:
        """This hospital's name on its consortium roster (hospital.toml [consortium] name)."""
        return self.settings.secagg_name or self.name()

    def consortium(self):
        """Who this hospital accepts as secure-aggregation peers: its pinned roster and own identity key;
        a simulated hospital: keys derived from the simulated hospitals' shared secret."""
        from secure_aggregation.identity import (
            Roster,
            RosterConsortium,
            SimulatedConsortium,
        )

        if self.settings.secagg_roster is not None:
            return RosterConsortium(Roster.load(self.settings.secagg_roster), self.settings.secagg_identity_key)
        simulated = self.defaults.get(SIMULATED_CONSORTIUM)
        if simulated is None and _simulated(self.context):
            simulated = str(Path(self.ledger_dir) / "consortium")
        if simulated is None:
            raise PolicyRefusal(
                f"{self.name()} refuses: secure aggregation needs its consortium roster, and none is configured",
                "set [consortium] roster and identity-key in hospital.toml",
            )
        return SimulatedConsortium.in_folder(str(simulated))

    def audit_log(self, hospital: str):
        """This hospital's signed audit log (next to its privacy ledger)."""
        from client.audit_trail import open_log

        return open_log(self.ledger_dir, hospital)

    def model(self, data: HospitalData):
        from shared_models.registry import build_model, resolve_model

        patches = self.request.patch_plan()
        return build_model(
            resolve_model(self.request.model, data.task),
            data.input_shape,
            self.request.hidden_units,
            patch=patches.size if patches is not None else None,
        )

    def ledger(self, data: HospitalData) -> PrivacyLedger:
        """The dataset's privacy ledger at this hospital's budget and delta, once it agrees with the
        hospital's signed audit chain (else ``LedgerTampered``: nothing is released)."""
        from client.ledger_guard import open_checked_ledger

        assert self.policy.epsilon_budget is not None  # check_request refuses DP without a budget
        return open_checked_ledger(
            self.audit_log(data.name),
            self.ledger_dir,
            data.name,
            self.dataset_id(data),
            budget=self.policy.epsilon_budget,
            delta=self.policy.delta,
        )

    @property
    def plan_id(self) -> str:
        """The run whose privacy plan this message follows: itself, or the run a resumed run continues."""
        return self.request.plan_run_id or str(self.context.run_id)

    def plan(self, data: HospitalData, ledger: PrivacyLedger, stats_needed: bool):
        from client.dp_trainer import steps_per_epoch

        steps = steps_per_epoch(len(data.y_train), self.request.batch_size)
        if self.request.personalise_rounds < 0:
            raise PolicyRefusal(
                f"{data.name} refuses: personalise-rounds={self.request.personalise_rounds} is "
                "negative (it would shrink the privacy plan)",
                "set personalise-rounds >= 0",
            )
        return ledger.plan_run(
            run_id=self.plan_id,
            # the personalisation rounds are planned and charged like the federation's
            rounds=self.request.num_rounds + self.request.personalise_rounds,
            steps_per_round=steps * self.request.local_epochs,
            sample_rate=1.0 / steps,
            run_epsilon=min(self.request.target_epsilon, self.policy.run_epsilon_cap()),
            stats_fraction=self.request.stats_budget_fraction if stats_needed else None,
        )


def _policy(context: Context, defaults: Mapping[str, Any], request: RunRequest) -> NodePolicy:
    """The hospital's policy: its node settings. A virtual node of Flower's Simulation Engine that was
    given no policy (``flwr run`` against a simulation SuperLink) is a researcher's stand-in hospital
    and accepts the run as it is; a deployed node without a budget refuses DP training."""
    settings = {**defaults, **context.node_config}
    if "epsilon-budget" not in settings and _simulated(context):
        return NodePolicy.accepting(request)
    return NodePolicy.from_settings(settings)


def _simulated(context: Context) -> bool:
    """Whether this ClientApp runs on a virtual node of Flower's Simulation Engine (a Ray actor)."""
    import sys

    ray = sys.modules.get("ray")
    return "num-partitions" in context.node_config and ray is not None and ray.is_initialized()


def _reply(msg: Message, data_name: str, report: Mapping[str, Any] | None = None, **records: Any) -> Message:
    """A reply: the hospital record (its name, plus ``report``'s prefixed keys) and ``records``."""
    content = RecordDict({protocol.HOSPITAL: hospital_record(data_name, report or {}), **records})
    return Message(content=content, reply_to=msg)


def _refusal_kind(exc: FedcareError) -> str:
    from client.ledger_guard import LedgerTampered

    if isinstance(exc, BudgetExhausted):
        return "budget"
    if isinstance(exc, PolicyRefusal):
        return "policy"
    if isinstance(exc, LedgerTampered):
        return "ledger"
    return "data"


def _refusal(msg: Message, name: str, exc: FedcareError) -> Message:
    # the received model may have been tested before the refusal: that evaluation is still sent
    return _reply(
        msg,
        name,
        getattr(exc, "evaluation", None),
        **{protocol.REFUSAL: Refusal(str(exc), _refusal_kind(exc)).to_record()},
    )


def _round_named(msg: Message) -> int:
    """The round a refused message names, for the audit log (0: it names none, or not as a number)."""
    try:
        return read(msg.content.config_records.get(protocol.CONFIG, {}), "server-round", "int", "run request", 0)
    except FedcareError:
        return 0


def _guarded(handler: Callable[[_Node, Message], Message], defaults: Mapping[str, Any]):
    def run(msg: Message, context: Context) -> Message:
        node = None
        name = f"partition {context.node_config.get('partition-id', defaults.get('partition-id', '?'))}"
        try:
            node = _Node(context, msg.content[protocol.CONFIG], defaults)
            name = node.name()
            node.policy.check_request(name, node.request)
            return handler(node, msg)
        except FedcareError as exc:
            reply = _refusal(msg, name, exc)
            try:
                from client import audit_trail

                ledger_dir = (
                    node.ledger_dir
                    if node is not None
                    else str(context.node_config.get("ledger-dir", defaults.get("ledger-dir", DEFAULT_LEDGER_DIR)))
                )
                audit_trail.refusal(
                    audit_trail.open_log(ledger_dir, name),
                    run_id=context.run_id,
                    round_=node.request.server_round if node is not None else _round_named(msg),
                    reason=str(exc),
                    kind=_refusal_kind(exc),
                )
            except FedcareError:
                pass  # the refusal itself is what the coordinator must hear about
            return reply

    return _traced(run)


def _traced(run: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """With $FEDCARE_TIMING_LOG set (the deployment benchmark), record when the handler ran."""

    def traced(msg: Message, context: Context) -> Message:
        if not timing.enabled():
            return run(msg, context)
        started = time.time()
        reply = run(msg, context)
        report = reply.content.config_records.get(protocol.HOSPITAL) if reply.has_content() else None
        timing.trace(
            "clientapp",
            type=msg.metadata.message_type,
            round=msg.metadata.group_id,
            node=context.node_id,
            process_start=timing.process_started_at(),
            handler_start=started,
            train_s=report.get(f"{protocol.TRAINED}train-seconds") if report is not None else None,
        )
        return reply

    return traced


def _public_size(node: _Node, data: HospitalData) -> float:
    """Training size the federation may know: DP steps per epoch x batch size (exact without DP).

    With DP, Opacus's sample rate 1/steps is public anyway; this reveals the size only to within
    one batch, and the server uses it to weight FedAvg and to divide the statistics sums.
    """
    from client.dp_trainer import steps_per_epoch

    n = len(data.y_train)
    if not node.dp:
        return float(n)
    batch = node.request.batch_size
    return float(steps_per_epoch(n, batch) * batch)


def _feature_stats(node: _Node, msg: Message) -> Message:
    data = node.data()
    bounds = data.numeric_bounds()
    rows = data.per_patient_numeric(data.x_train)
    from client import audit_trail

    epsilon = None
    dp_params = None
    dataset_id = node.dataset_id(data)
    if not node.dp:
        values: Any = local_sums(rows, bounds, None, None)
    else:
        ledger = node.ledger(data)
        key = stats_key(data.numeric_features, data.feature_bounds, data.fingerprint())
        values = ledger.feature_stats(key) if bounds else local_sums(rows, bounds, None, None)  # empty: no cost
        plan = node.plan(data, ledger, stats_needed=values is None)
        fresh = values is None
        if fresh:
            values = local_sums(rows, bounds, plan.stats_noise_multiplier, node.rng(data, "feature-stats"))
            ledger.record(
                str(node.context.run_id),
                0,
                "feature-stats",
                [(plan.stats_noise_multiplier, 1.0, 1)],
                stats_key=key,
                values=values,
                data_fingerprint=data.fingerprint(),
            )
        epsilon = ledger.epsilon()
        # a re-sent paid-for answer (or an empty one) is post-processing: zero steps
        dp_params = audit_trail.DPParams(
            plan.stats_noise_multiplier or 0.0, 1.0, 1 if fresh else 0, None, node.policy.delta
        )
    audit_trail.release(
        node.audit_log(data.name),
        run_id=node.context.run_id,
        round_=0,
        stage="feature-stats",
        data_fingerprint=data.fingerprint(),
        global_arrays=None,
        sent=released_arrays(values),
        dp=dp_params,
        epsilon=epsilon,
        secagg=None,
        dataset_id=dataset_id,
    )
    return Message(content=_stats_reply(node, data, bounds, values, epsilon).encode(), reply_to=msg)


def _stats_reply(
    node: _Node, data: HospitalData, bounds: Any, values: dict[str, Any], epsilon: float | None
) -> StatsReply:
    """The statistics round's reply: the released sums, this hospital's feature schema and its privacy."""
    schema = FeatureSchema(
        tuple(data.numeric_features),
        tuple(float(lo) for lo, _ in bounds),
        tuple(float(hi) for _, hi in bounds),
        tuple(data.input_shape),
        data.task,
    )
    return StatsReply(
        data.name,
        values["sum"],
        values["second"],
        values["observed"],
        values["noise_std"],
        _public_size(node, data),
        schema,
        epsilon,
        _privacy_note(node),
    )


def _privacy_note(node: _Node) -> PrivacyNote:
    """What the hospital says about its own release: its delta, and whether the noise was secret."""
    return PrivacyNote(node.policy.delta if node.dp else None, node.private)


def _prepared(node: _Node, data: HospitalData, x: np.ndarray) -> np.ndarray:
    inputs = ModelInputs.from_config(node.config)
    return data.prepared(x, inputs.norm_mean, inputs.norm_std)


def _train(node: _Node, msg: Message) -> Message:
    """Train on the received model; first test it when asked (the previous round's evaluation)."""
    evaluation = None
    if ModelInputs.from_config(node.config).evaluate_incoming and node.policy.release_evaluation != "none":
        # in the hospital record, not a MetricRecord: a train reply's one MetricRecord is what the
        # strategy aggregates
        evaluation = _test_metrics(node, msg).to_record(protocol.EVALUATION)
    try:
        return _train_received(node, msg, evaluation or {})
    except FedcareError as exc:
        exc.evaluation = evaluation
        raise


def _dp_round(node: _Node, data: HospitalData, round_: int | None = None) -> tuple[Any, Any, Any, Any]:
    """DP settings for round ``round_`` (default: the request's) from the hospital's own privacy plan:
    (settings, ledger, the plan as first made, the re-plan after a coordinator crash or None); all None
    without DP."""
    from client.dp_trainer import DPSettings

    if not node.dp:
        return None, None, None, None
    ledger = node.ledger(data)
    planned = ledger.plan(node.plan_id) or node.plan(data, ledger, stats_needed=False)
    # a round asked for again after a coordinator crash was paid for already: the hospital re-plans
    # the rounds left from its own ledger and plan, so they still fit the plan's target
    plan, replan = ledger.plan_for_round(node.plan_id, node.request.server_round if round_ is None else round_)
    ledger.check_release([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)])
    # the plan's sample rate and steps, not ones recomputed from today's data: the ledger records what
    # the plan counted, whatever size the data has now
    epochs = node.request.local_epochs
    if epochs < 1 or plan.steps_per_round % epochs:
        raise PolicyRefusal(
            f"{data.name} refuses: local-epochs={epochs} does not divide the "
            f"{plan.steps_per_round} DP steps a round its privacy plan for run "
            f"{node.plan_id} counts",
            "resume with the run's own local-epochs",
        )
    dp = DPSettings(plan.noise_multiplier, node.request.max_grad_norm, plan.sample_rate, plan.steps_per_round // epochs)
    return dp, ledger, planned, replan


def _charge_training(
    node: _Node, data: HospitalData, round_dp: tuple[Any, Any, Any, Any], outcome: Any, trained: TrainReport
) -> tuple[float, TrainReport]:
    """Charge the round's training to the ledger; (epsilon spent so far, the report with what DP did)."""
    dp, ledger, planned, replan = round_dp
    # Charged as soon as training ran: whatever happens to the update next, the round is paid for.
    eps = _charge(node, data, ledger, dp, outcome, node.request.server_round, "train")
    trained = dataclasses.replace(
        trained, epsilon=eps, noise_multiplier=dp.noise_multiplier, steps=sum(k for _, _, k in outcome.steps)
    )
    if replan is not None:  # what a crash cost this hospital, for the coordinator's report
        trained = dataclasses.replace(
            trained,
            planned_noise_multiplier=planned.noise_multiplier,
            replanned_from_round=replan.from_round,
            lost_rounds=list(replan.lost_rounds),
        )
    return eps, trained


def _charge(node: _Node, data: HospitalData, ledger: Any, dp: Any, outcome: Any, round_: int, stage: str) -> float:
    """Record local training's DP steps in the ledger under this run's plan; the epsilon spent after it."""
    return float(
        ledger.record(
            str(node.context.run_id),
            round_,
            stage,
            outcome.steps,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            data_fingerprint=data.fingerprint(),
            plan_run_id=node.plan_id,
        )
    )


def _local_training(
    node: _Node, data: HospitalData, model: Any, dp: Any, rng: Any, proximal_mu: float = 0.0, lr_scale: float = 1.0
) -> Any:
    """One round of local training on this hospital's training split with the run's settings
    (``lr_scale`` x its learning rate: personalisation fine-tunes more gently than a round trains)."""
    from client.dp_trainer import train

    return train(
        model,
        _prepared(node, data, data.x_train),
        data.y_train,
        epochs=node.request.local_epochs,
        batch_size=node.request.batch_size,
        lr=node.request.learning_rate * lr_scale,
        weight_decay=node.request.weight_decay,
        dp=dp,
        rng=rng,
        proximal_mu=proximal_mu,
        optimizer_name=node.request.local_optimizer,
        patches=node.request.patch_plan(),
    )


def _train_received(node: _Node, msg: Message, report: dict[str, Any]) -> Message:
    from shared_models.weights import load_arrays, model_to_arrays, parameter_values

    data = node.data()
    secure = asks_secure_update(node.config)
    if not secure:
        node.policy.check_plain_update(data.name)  # the server dropped the masking it promised
    server_round = node.request.server_round
    model = node.model(data)
    global_arrays = received_model(msg.content)
    load_arrays(model, global_arrays)
    dp, ledger, planned, replan = _dp_round(node, data)
    started = time.perf_counter()
    outcome = _local_training(
        node, data, model, dp, node.rng(data, "train", server_round), proximal_mu=node.request.proximal_mu
    )
    # local training wall time (to 10 ms), so the coordinator can tell training from round overhead
    train_seconds = round(time.perf_counter() - started, 2)
    trained = TrainReport(train_seconds=train_seconds, privacy=_privacy_note(node))
    eps = None
    if ledger is not None:
        eps, trained = _charge_training(node, data, (dp, ledger, planned, replan), outcome, trained)
    weight = _public_size(node, data)
    records: dict[str, Any] = {}
    masked_with: list[int] = []
    if secure:
        from client import secure_update
        from secure_aggregation.messages import MaskRequest

        # The whole reply is then the hospital record: the weight travels masked, not as a metric.
        update = secure_update.masked_update(
            node.secagg_state(),
            node.consortium(),
            MaskRequest.from_config(node.config),
            global_arrays,
            parameter_values(model),
            int(weight),
            node.request.secagg_clip_range,
        )
        sent: Any = {"masked": update.masked}
        masked_with = update.active
        report = report | update.to_config()
    else:
        sent = model_to_arrays(model)
        # the training loss only without DP or secure aggregation
        records = plain_train_reply(sent, weight, outcome.mean_loss if ledger is None else None)
    _audit_train(node, data, global_arrays, sent, masked_with if secure else None, outcome, dp, eps)
    report = report | trained.to_record()
    return _reply(msg, data.name, report, **records)


def _audit_train(
    node: _Node,
    data: HospitalData,
    global_arrays: Any,
    sent: Any,
    masked_with: list[int] | None,
    outcome: Any,
    dp: Any,
    eps: float | None,
) -> None:
    """The release record: under secure aggregation, with the node set this hospital masked with."""
    from client import audit_trail

    secagg = (
        audit_trail.SecAggInfo(role="masked", participants=sorted(masked_with), threshold=None)
        if masked_with is not None
        else audit_trail.SecAggInfo(role="plain")
    )
    _audit_release(node, data, global_arrays, sent, secagg, outcome, dp, eps, node.request.server_round, "train")


def _audit_release(
    node: _Node,
    data: HospitalData,
    global_arrays: Any,
    sent: Any,
    secagg: Any,
    outcome: Any,
    dp: Any,
    eps: float | None,
    round_: int,
    stage: str,
) -> None:
    """One local-training release in the hospital's signed audit log, with the DP steps it took."""
    from client import audit_trail

    dp_params = (
        audit_trail.DPParams.from_entries(outcome.steps, dp.max_grad_norm, node.policy.delta)
        if dp is not None
        else None
    )
    audit_trail.release(
        node.audit_log(data.name),
        run_id=node.context.run_id,
        round_=round_,
        stage=stage,
        data_fingerprint=data.fingerprint(),
        global_arrays=global_arrays,
        sent=sent,
        dp=dp_params,
        epsilon=eps,
        secagg=secagg,
        dataset_id=node.dataset_id(data),
    )


def _evaluate(node: _Node, msg: Message) -> Message:
    """Test the received model; on the final model, first adapt it to this hospital (personalisation)."""
    personalised, report = None, {}
    if ModelInputs.from_config(node.config).personalise and node.request.personalise_rounds > 0:
        try:
            personalised, eps = _personalise(node, received_model(msg.content))
            report = {} if eps is None else {protocol.PERSONALISED_EPSILON: eps}
        except BudgetExhausted:
            pass  # nothing left to fine-tune with: the federated model is still tested and reported
    data = node.data(for_training=False)
    if node.policy.release_evaluation == "none":
        return _reply(msg, data.name, report | evaluation_withheld())
    report |= {} if personalised is None else personalised.to_record(protocol.PERSONALISED)
    return _reply(msg, data.name, report, **{protocol.METRICS: MetricRecord(_test_metrics(node, msg).to_record())})


def _personalise(node: _Node, global_arrays: Any) -> tuple[EvaluationMetrics, float | None]:
    """Fine-tune the federation's final model on this hospital's training data for
    ``personalise-rounds`` rounds, as local training under the same privacy plan (planned from the
    run's start, DP, charged to the ledger and audited as stage ``personalise``), keep the model on
    this hospital's disk and return its test metrics and the epsilon spent after it (None without
    DP). The personalised model never leaves."""
    from client.dp_trainer import evaluate
    from shared_models.weights import load_arrays

    data = node.data()
    model = node.model(data)
    load_arrays(model, global_arrays)
    eps = None
    for j in range(1, node.request.personalise_rounds + 1):
        rnd = node.request.num_rounds + j
        dp, ledger, _, _ = _dp_round(node, data, rnd)
        rng = node.rng(data, "personalise", rnd)
        lr_scale = personalise_lr_scale(node.request.personalise_lr_scale, node.dp)
        outcome = _local_training(node, data, model, dp, rng, lr_scale=lr_scale)
        if ledger is not None:
            eps = _charge(node, data, ledger, dp, outcome, rnd, "personalise")
        # a charged release of its own: only the personalised model's test metrics leave the hospital
        _audit_release(node, data, global_arrays, {}, None, outcome, dp, eps, rnd, "personalise")
    _keep_personalised(node, data, model)
    return EvaluationMetrics.from_summary(evaluate(model, _prepared(node, data, data.x_test), data.y_test)), eps


def _keep_personalised(node: _Node, data: HospitalData, model: Any) -> None:
    """The personalised model, on this hospital's disk: <ledger-dir>/personalised/<hospital>-run-<run>.npz."""
    import io

    from client.audit_trail import file_slug
    from fedcare.atomic_files import replace_file
    from shared_models.weights import arrays_to_numpy, model_to_arrays

    buffer = io.BytesIO()
    np.savez(buffer, **arrays_to_numpy(model_to_arrays(model)))  # type: ignore[arg-type]  # numpy's stub: **arrays is also matched against allow_pickle: bool
    folder = Path(node.ledger_dir) / "personalised"
    folder.mkdir(parents=True, exist_ok=True)
    replace_file(folder / f"{file_slug(data.name)}-run-{node.plan_id}.npz", buffer.getvalue())


def _test_metrics(node: _Node, msg: Message) -> EvaluationMetrics:
    """Confusion matrix and score histograms of the received model on this hospital's test split."""
    from client.dp_trainer import evaluate
    from shared_models.weights import load_arrays

    data = node.data(for_training=False)
    model = node.model(data)
    load_arrays(model, received_model(msg.content))
    return EvaluationMetrics.from_summary(evaluate(model, _prepared(node, data, data.x_test), data.y_test))


def _secagg_setup(node: _Node, msg: Message) -> Message:
    """Key agreement: advertise signed keys (policy: federation size and threshold), then check every
    member's advertisement and deal the first mask key's shares (policy: verified members >= minimum)."""
    from client import secure_update
    from secure_aggregation import messages

    path = node.secagg_state()
    secure_update.forget_abandoned(node.ledger_dir, keep=path)
    reply: messages.AdvertiseReply | messages.ShareKeysReply
    if msg.metadata.message_type == protocol.SECAGG_ADVERTISE:
        asked = messages.KeyAgreementRequest.from_config(node.config)
        node.policy.check_federation(node.name(), len(asked.nodes), asked.threshold, asked.neighbours)
        reply = secure_update.advertise(
            path,
            node.consortium(),
            node.context.run_id,
            node.context.node_id,
            node.member_name(),
            asked,
            floor=node.policy.min_secagg_threshold,
        )
    else:
        request = messages.ShareKeysRequest.from_config(node.config)
        reply = secure_update.share_keys(path, node.consortium(), request, min_nodes=node.policy.min_hospitals)
    return _reply(msg, node.name(), reply.to_config())


def _secagg_view(node: _Node, msg: Message) -> Message:
    """Some hospital dropped: sign the one view of who survived that this node will act on."""
    from client import secure_update
    from secure_aggregation import messages

    reply = secure_update.sign_view(
        node.secagg_state(), node.consortium(), messages.ViewRequest.from_config(node.config)
    )
    return _reply(msg, node.name(), reply.to_config())


def _secagg_unmask(node: _Node, msg: Message) -> Message:
    from client import audit_trail, secure_update
    from secure_aggregation import messages

    request = messages.UnmaskRequest.from_config(node.config)
    reply = secure_update.unmask(node.secagg_state(), node.consortium(), request)
    audit_trail.unmask(
        node.audit_log(node.name()),
        run_id=node.context.run_id,
        round_=request.round,
        survivors=reply.survivors,
        dropped=reply.dropped,
    )
    return _reply(msg, node.name(), reply.to_config())


def _secagg_end(node: _Node, msg: Message) -> Message:
    """The run is over (finished or failed): delete this run's private key material."""
    from client import secure_update

    secure_update.end(node.secagg_state())
    return _reply(msg, node.name())


def make_client_app(node_defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``node_defaults`` stand in for node config in in-process simulations."""
    defaults = dict(node_defaults or {})
    client_app = ClientApp()
    client_app.query("feature_stats")(_guarded(_feature_stats, defaults))
    client_app.query("secagg_advertise")(_guarded(_secagg_setup, defaults))
    client_app.query("secagg_share_keys")(_guarded(_secagg_setup, defaults))
    client_app.query("secagg_view")(_guarded(_secagg_view, defaults))
    client_app.query("secagg_unmask")(_guarded(_secagg_unmask, defaults))
    client_app.query("secagg_end")(_guarded(_secagg_end, defaults))
    client_app.train()(_guarded(_train, defaults))
    client_app.evaluate()(_guarded(_evaluate, defaults))
    return client_app


app = make_client_app()
