"""The hospital's ClientApp: statistics, DP training and evaluation on local data.

Settings come from the coordinator's message (what to train) and from the node (which data, where
the ledger is, what privacy budget the hospital grants). Hospital-owned settings are read from the
node config only, never from the coordinator's run config or messages, so a coordinator cannot
raise a hospital's budget; a node that sets no ``epsilon-budget`` accepts the run's
``target-epsilon`` as its budget. Errors the hospital can fix, and budget refusals,
are replied as a ``refusal`` record with a one-line reason instead of a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.datasets import DataSource, HospitalData, load_hospital
from client.feature_stats import local_sums, stats_key
from fedcare import protocol, timing
from fedcare.errors import BudgetExhausted, FedcareError

if TYPE_CHECKING:
    from client.privacy_ledger import PrivacyLedger

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

    def setting(self, key: str, fallback: Any = None) -> Any:
        """A hospital-owned setting: node config, else the in-process simulation's stand-in."""
        for source in (self.context.node_config, self.defaults):
            if key in source:
                return source[key]
        return fallback

    @property
    def dp(self) -> bool:
        return bool(self.config["dp"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"]) * 1000 + int(self.setting("partition-id", 0))

    def source(self) -> DataSource:
        """Where this hospital's data is: node config (run config only for a shared data root)."""
        def text(key: str) -> str | None:
            value = self.setting(key)
            return None if value in (None, "") else str(value)

        partition = self.setting("partition-id")
        root = text("data-root") or (str(self.context.run_config["data-root"])
                                     if self.context.run_config.get("data-root") else None)
        return DataSource(
            partition_id=None if partition is None else int(partition),
            data_root=root, data_path=text("data-path"), labels=text("labels"), schema=text("schema"),
            cache_dir=str(self.setting("cache-dir", "fedcare-cache")),
            image_size=int(self.config.get("image-size", 64)),
            multiframe=str(self.setting("multiframe", "first")),
            require_deidentified=_flag(self.setting("require-deidentified", True)),
            on_unreadable=str(self.setting("on-unreadable", "error")),
        )

    def data(self, for_training: bool = True) -> HospitalData:
        data = _hospital(str(self.config["dataset"]), self.source())
        if for_training:
            data.check_trainable(int(self.config["batch-size"]))
        return data

    @property
    def ledger_dir(self) -> str:
        """The hospital's private state folder: privacy ledgers and secure-aggregation keys."""
        return str(self.setting("ledger-dir", self.context.run_config.get("ledger-dir", "fedcare-ledgers")))

    def secagg_state(self) -> Path:
        """This node's secure-aggregation state file for this run (private keys: hospital-side)."""
        from client.secure_update import state_file

        return state_file(self.ledger_dir, self.context.run_id, self.context.node_id)

    def audit_log(self, hospital: str):
        """This hospital's signed audit log (next to its privacy ledger)."""
        from client.audit_trail import open_log

        return open_log(self.ledger_dir, hospital)

    def model(self, data: HospitalData):
        from shared_models.registry import build_model, resolve_model

        return build_model(resolve_model(str(self.config["model"]), data.task), data.input_shape,
                           int(self.config.get("hidden-units", 32)))

    def ledger(self, data: HospitalData) -> PrivacyLedger:
        from client.privacy_ledger import PrivacyLedger

        budget = float(self.setting("epsilon-budget", self.config["target-epsilon"]))
        return PrivacyLedger.open(
            self.ledger_dir, data.name, data.fingerprint(),
            budget=budget, delta=float(self.config["delta"]),
        )

    @property
    def plan_id(self) -> str:
        """The run whose privacy plan this message follows: itself, or the run a resumed run continues."""
        return str(self.config.get("plan-run-id") or self.context.run_id)

    def plan(self, data: HospitalData, ledger: PrivacyLedger, stats_needed: bool):
        from client.dp_trainer import steps_per_epoch

        steps = steps_per_epoch(len(data.y_train), int(self.config["batch-size"]))
        return ledger.plan_run(
            run_id=self.plan_id,
            rounds=int(self.config["num-rounds"]),
            steps_per_round=steps * int(self.config["local-epochs"]),
            sample_rate=1.0 / steps,
            run_epsilon=float(self.config["target-epsilon"]),
            stats_fraction=float(self.config["stats-budget-fraction"]) if stats_needed else None,
        )


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off")
    return bool(value)


def _reply(msg: Message, data_name: str, report: Mapping[str, Any] | None = None, **records: Any) -> Message:
    """A reply: the hospital record (its name, plus ``report``'s prefixed keys) and ``records``."""
    content = RecordDict({protocol.HOSPITAL: ConfigRecord({"name": data_name, **(report or {})}), **records})
    return Message(content=content, reply_to=msg)


def _secure(msg: Message) -> bool:
    """Whether the server's message carries a secure-aggregation request."""
    return any(key.startswith(protocol.SECAGG) for key in msg.content[protocol.CONFIG].keys())


def _refusal(msg: Message, name: str, exc: FedcareError) -> Message:
    from secure_aggregation import ClipRangeError

    kind = "budget" if isinstance(exc, BudgetExhausted) else "clip-range" if isinstance(exc, ClipRangeError) else "data"
    # the received model may have been tested before the refusal: that evaluation is still sent
    return _reply(msg, name, getattr(exc, "evaluation", None),
                  **{protocol.REFUSAL: ConfigRecord({"reason": str(exc), "kind": kind})})


def _guarded(handler: Callable[[_Node, Message], Message], defaults: Mapping[str, Any]):
    def run(msg: Message, context: Context) -> Message:
        node = _Node(context, msg.content[protocol.CONFIG], defaults)
        try:
            return handler(node, msg)
        except FedcareError as exc:
            name = f"partition {node.setting('partition-id', '?')}"
            try:
                name = _hospital(str(node.config["dataset"]), node.source()).name
            except (FedcareError, ValueError, TypeError):
                pass
            reply = _refusal(msg, name, exc)
            try:
                from client import audit_trail

                audit_trail.refusal(node.audit_log(name), run_id=context.run_id,
                                    round_=int(node.config.get("server-round", 0)), reason=str(exc),
                                    kind=str(reply.content.config_records[protocol.REFUSAL]["kind"]))
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
        timing.trace("clientapp", type=msg.metadata.message_type, round=msg.metadata.group_id,
                     node=context.node_id, process_start=timing.process_started_at(), handler_start=started,
                     train_s=report.get(f"{protocol.TRAINED}train-seconds") if report is not None else None)
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
    batch = int(node.config["batch-size"])
    return float(steps_per_epoch(n, batch) * batch)


def _feature_stats(node: _Node, msg: Message) -> Message:
    data = node.data()
    bounds = data.numeric_bounds()
    rows = data.per_patient_numeric(data.x_train)
    rng = np.random.default_rng(node.seed)
    from client import audit_trail

    metrics: dict[str, Any] = {}
    dp_params = None
    if not node.dp:
        values = local_sums(rows, bounds, None, rng)
    else:
        ledger = node.ledger(data)
        key = stats_key(data.numeric_features, data.feature_bounds)
        values = ledger.feature_stats(key) if bounds else {"sum": []}  # nothing to release: no cost
        plan = node.plan(data, ledger, stats_needed=values is None)
        fresh = values is None
        if fresh:
            values = local_sums(rows, bounds, plan.stats_noise_multiplier, rng)
            ledger.record(str(node.context.run_id), 0, "feature-stats",
                          [(plan.stats_noise_multiplier, 1.0, 1)], stats_key=key, values=values)
        metrics["epsilon"] = ledger.epsilon()
        # a re-sent paid-for answer (or an empty one) is post-processing: zero steps
        dp_params = audit_trail.DPParams(plan.stats_noise_multiplier or 0.0, 1.0, 1 if fresh else 0, None,
                                         float(node.config["delta"]))
    audit_trail.release(node.audit_log(data.name), run_id=node.context.run_id, round_=0, stage="feature-stats",
                        data_fingerprint=data.fingerprint(), global_arrays=None,
                        sent={"sum": np.asarray(values["sum"], dtype=np.float64)}, dp=dp_params,
                        epsilon=metrics.get("epsilon"), secagg=None)
    metrics |= {"sum": values["sum"], protocol.NUM_EXAMPLES: _public_size(node, data)}
    features = ConfigRecord({
        "names": data.numeric_features, "input-shape": list(data.input_shape), "task": data.task,
        "bounds-lo": [float(lo) for lo, _ in bounds], "bounds-hi": [float(hi) for _, hi in bounds],
    })
    return _reply(msg, data.name, **{protocol.METRICS: MetricRecord(metrics), "features": features})


def _prepared(node: _Node, data: HospitalData, x: np.ndarray) -> np.ndarray:
    return data.prepared(x, list(node.config["norm-mean"]), list(node.config["norm-std"]))


def _train(node: _Node, msg: Message) -> Message:
    """Train on the received model; first test it when asked (the previous round's evaluation)."""
    evaluation = None
    if node.config.get(protocol.EVALUATE_INCOMING):
        # in the hospital record, not a MetricRecord: a train reply's one MetricRecord is what the
        # strategy aggregates
        evaluation = {f"{protocol.EVALUATION}{k}": v for k, v in _test_metrics(node, msg).items()}
    try:
        return _train_received(node, msg, evaluation or {})
    except FedcareError as exc:
        exc.evaluation = evaluation
        raise


def _train_received(node: _Node, msg: Message, report: dict[str, Any]) -> Message:
    from client.dp_trainer import DPSettings, train
    from shared_models.weights import load_arrays, model_to_arrays

    data = node.data()
    server_round = int(node.config["server-round"])
    model = node.model(data)
    global_arrays = _received_model(msg)
    load_arrays(model, global_arrays)
    dp, ledger, plan = None, None, None
    if node.dp:
        ledger = node.ledger(data)
        plan = ledger.plan(node.plan_id) or node.plan(data, ledger, stats_needed=False)
        ledger.check_release([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)])
        dp = DPSettings(plan.noise_multiplier, float(node.config["max-grad-norm"]))
    started = time.perf_counter()
    outcome = train(
        model, _prepared(node, data, data.x_train), data.y_train,
        epochs=int(node.config["local-epochs"]), batch_size=int(node.config["batch-size"]),
        lr=float(node.config["learning-rate"]), weight_decay=float(node.config["weight-decay"]),
        dp=dp, seed=node.seed * 1000 + server_round, proximal_mu=float(node.config.get("proximal-mu", 0.0)),
    )
    # local training wall time (to 10 ms), so the coordinator can tell training from round overhead
    train_seconds = round(time.perf_counter() - started, 2)
    trained: dict[str, Any] = {"train-seconds": train_seconds}
    weight = _public_size(node, data)
    request, sent = None, model_to_arrays(model)
    records: dict[str, Any] = {}
    if _secure(msg):
        from client import secure_update

        # Masked before the ledger records: an update outside the clip range is never released.
        # The whole reply is then the hospital record: the weight travels masked, not as a metric.
        request = secure_update.payload(msg.content)
        masked, secagg = secure_update.masked_update(
            node.secagg_state(), request, global_arrays, sent, int(weight), float(node.config["secagg-clip-range"]))
        sent = {"masked": masked}
        report = report | secagg
    else:
        records = {protocol.ARRAYS: sent, protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: weight})}
    eps = None
    if ledger is not None:
        eps = ledger.record(str(node.context.run_id), server_round, "train", outcome.steps,
                            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm)
        trained.update({"epsilon": eps, "noise-multiplier": dp.noise_multiplier,
                        "steps": sum(k for _, _, k in outcome.steps)})
    elif request is None:
        records[protocol.METRICS]["train-loss"] = outcome.mean_loss  # only without DP or secure aggregation
    _audit_train(node, data, global_arrays, sent, request, outcome, dp, eps)
    report = report | {f"{protocol.TRAINED}{k}": v for k, v in trained.items()}
    return _reply(msg, data.name, report, **records)


def _audit_train(node: _Node, data: HospitalData, global_arrays: Any, sent: Any,
                 request: dict | None, outcome: Any, dp: Any, eps: float | None) -> None:
    from client import audit_trail

    secure = request is not None
    secagg = audit_trail.SecAggInfo(
        role="masked" if secure else "plain",
        participants=sorted(int(v) for v in (request.get("active") or [])) if request is not None else [],
        threshold=None) if secure else audit_trail.SecAggInfo(role="plain")
    dp_params = (audit_trail.DPParams.from_entries(outcome.steps, dp.max_grad_norm, float(node.config["delta"]))
                 if dp is not None else None)
    audit_trail.release(node.audit_log(data.name), run_id=node.context.run_id, round_=int(node.config["server-round"]),
                        stage="train", data_fingerprint=data.fingerprint(), global_arrays=global_arrays,
                        sent=sent, dp=dp_params, epsilon=eps,
                        secagg=secagg)


def _evaluate(node: _Node, msg: Message) -> Message:
    data = node.data(for_training=False)
    return _reply(msg, data.name, **{protocol.METRICS: _test_metrics(node, msg)})


def _received_model(msg: Message) -> Any:
    """The global model a train or evaluate message carries (packed by the server; an ArrayRecord also works)."""
    from shared_models.weights import unpack_arrays

    if protocol.MODEL in msg.content.config_records:
        return unpack_arrays(msg.content.config_records[protocol.MODEL])
    return msg.content[protocol.ARRAYS]


def _test_metrics(node: _Node, msg: Message) -> MetricRecord:
    """Confusion matrix and score histograms of the received model on this hospital's test split."""
    from client.dp_trainer import evaluate
    from shared_models.weights import load_arrays

    data = node.data(for_training=False)
    model = node.model(data)
    load_arrays(model, _received_model(msg))
    s = evaluate(model, _prepared(node, data, data.x_test), data.y_test)
    return MetricRecord({
        "tp": s.tp, "fp": s.fp, "tn": s.tn, "fn": s.fn, "loss-sum": s.loss_sum,
        "pos-hist": s.pos_hist.tolist(), "neg-hist": s.neg_hist.tolist(),
        protocol.NUM_EXAMPLES: s.n,
    })


def _secagg_setup(node: _Node, msg: Message) -> Message:
    from client import secure_update

    data = node.data(for_training=False)
    request = secure_update.payload(msg.content)
    if msg.metadata.message_type == protocol.SECAGG_ADVERTISE:
        report = secure_update.advertise(node.secagg_state(), node.context.run_id, node.context.node_id, request)
    else:
        report = secure_update.share_keys(node.secagg_state(), request)
    return _reply(msg, data.name, report)


def _secagg_unmask(node: _Node, msg: Message) -> Message:
    from client import secure_update

    data = node.data(for_training=False)
    from client import audit_trail

    request = secure_update.payload(msg.content)
    last = int(request["round"]) >= int(node.config["num-rounds"])
    revealed = secure_update.unmask(node.secagg_state(), request, last)
    audit_trail.unmask(node.audit_log(data.name), run_id=node.context.run_id, round_=int(request["round"]),
                       survivors=[int(v) for v in request["survivors"]],
                       dropped=[int(v) for v in request.get("dropped", [])])
    return _reply(msg, data.name, revealed)


def make_client_app(node_defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``node_defaults`` stand in for node config in in-process simulations."""
    defaults = dict(node_defaults or {})
    client_app = ClientApp()
    client_app.query("feature_stats")(_guarded(_feature_stats, defaults))
    client_app.query("secagg_advertise")(_guarded(_secagg_setup, defaults))
    client_app.query("secagg_share_keys")(_guarded(_secagg_setup, defaults))
    client_app.query("secagg_unmask")(_guarded(_secagg_unmask, defaults))
    client_app.train()(_guarded(_train, defaults))
    client_app.evaluate()(_guarded(_evaluate, defaults))
    return client_app


app = make_client_app()
