"""Typed wire messages (fedcare/wire.py): every message round-trips with today's record keys, and a
malformed record is refused by message and field name, never a KeyError."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedcare import protocol
from fedcare.errors import FedcareError
from fedcare.wire import (
    EvaluationMetrics,
    FeatureSchema,
    ModelInputs,
    PrivacyNote,
    Refusal,
    StatsReply,
    TrainReport,
    hospital_name,
)
from secure_aggregation.messages import KeyAgreementRequest, UnmaskRequest
from shared_models.classification_metrics import BinarySummary
from tests.support.inprocess_grid import task_identity  # noqa: F401  (Flower's task identity, autouse)

SCHEMA = FeatureSchema(("age", "bp"), (0.0, 50.0), (100.0, 250.0), (2,), "binary")
STATS = StatsReply(
    "St Elsewhere",
    [12.5, 40.25],
    [-3.0, 1.5],
    [29.5, 30.0],
    2.25,
    60.0,
    SCHEMA,
    epsilon=0.25,
    privacy=PrivacyNote(1e-5, False),
)
EVAL = EvaluationMetrics(tp=3, fp=1, tn=5, fn=2, loss_sum=4.5, pos_hist=[0, 2, 3], neg_hist=[4, 1, 1], num_examples=11)
TRAINED = TrainReport(
    train_seconds=1.25,
    epsilon=0.5,
    noise_multiplier=1.1,
    steps=8,
    planned_noise_multiplier=0.9,
    replanned_from_round=3,
    lost_rounds=[2],
    privacy=PrivacyNote(1e-5),
)


def test_each_message_round_trips() -> None:
    assert StatsReply.decode(STATS.encode()) == STATS
    empty = StatsReply("H", [], [], [], 0.0, 30.0, FeatureSchema((), (), (), (4, 4), "binary"))
    assert StatsReply.decode(empty.encode()).sums == []
    refusal = Refusal("H refuses: no budget", "budget")
    assert Refusal.from_content(RecordDict({protocol.REFUSAL: refusal.to_record()})) == refusal
    assert Refusal.from_content(RecordDict({})) is None
    assert EvaluationMetrics.from_record(EVAL.to_record()) == EVAL
    assert (
        EvaluationMetrics.in_train_reply(
            RecordDict({protocol.HOSPITAL: ConfigRecord({"name": "H", **EVAL.to_record(protocol.EVALUATION)})})
        )
        == EVAL
    )
    assert EvaluationMetrics.in_evaluate_reply(RecordDict({protocol.METRICS: MetricRecord(EVAL.to_record())})) == EVAL
    assert EvaluationMetrics.in_train_reply(RecordDict({protocol.HOSPITAL: ConfigRecord({"name": "H"})})) is None
    assert TrainReport.from_record(TRAINED.to_record()) == TRAINED
    assert TrainReport.from_record({}) == TrainReport()
    inputs = ModelInputs([0.5, 1.0], [2.0, 3.0], evaluate_incoming=True)
    assert ModelInputs.from_config(inputs.to_config()) == inputs
    asked = KeyAgreementRequest.from_payload({"threshold": 2, "neighbours": 3, "nodes": [100, 101, 102]})
    assert asked == KeyAgreementRequest(2, 3, [100, 101, 102])
    assert UnmaskRequest.from_payload({"round": 4, "path": "consistency", "survivors": [1]}).round == 4
    summary = EVAL.summary()
    assert EvaluationMetrics.from_summary(summary) == EVAL
    assert isinstance(summary, BinarySummary) and summary.pos_hist.dtype == np.int64


def test_the_record_keys_on_the_wire_are_unchanged() -> None:
    """A node and a server of this version interoperate with the previous one: same keys, same values."""
    content = STATS.encode()
    assert dict(content.config_records[protocol.HOSPITAL]) == {
        "name": "St Elsewhere",
        "stats/delta": 1e-5,
        "stats/not-private": True,
    }
    assert dict(content.metric_records[protocol.METRICS]) == {
        "epsilon": 0.25,
        "sum": [12.5, 40.25],
        "second": [-3.0, 1.5],
        "observed": [29.5, 30.0],
        "noise-std": 2.25,
        "num-examples": 60.0,
    }
    assert dict(content.config_records["features"]) == {
        "names": ["age", "bp"],
        "input-shape": [2],
        "task": "binary",
        "bounds-lo": [0.0, 50.0],
        "bounds-hi": [100.0, 250.0],
    }
    assert EVAL.to_record() == {
        "tp": 3,
        "fp": 1,
        "tn": 5,
        "fn": 2,
        "loss-sum": 4.5,
        "pos-hist": [0, 2, 3],
        "neg-hist": [4, 1, 1],
        "num-examples": 11,
    }
    assert TRAINED.to_record() == {
        "trained/train-seconds": 1.25,
        "trained/epsilon": 0.5,
        "trained/noise-multiplier": 1.1,
        "trained/steps": 8,
        "trained/planned-noise-multiplier": 0.9,
        "trained/replanned-from-round": 3,
        "trained/lost-rounds": [2],
        "trained/delta": 1e-5,
    }
    assert ModelInputs([1.0], [2.0]).to_config() == {"norm-mean": [1.0], "norm-std": [2.0]}
    assert ModelInputs([1.0], [2.0], personalise=True).to_config()["personalise"] is True
    assert Refusal("no", "data").to_record() == ConfigRecord({"reason": "no", "kind": "data"})


def _stats_with(section: str, key: str, value: object) -> RecordDict:
    content = STATS.encode()
    record = dict(content.config_records[section] if section != protocol.METRICS else content.metric_records[section])
    if value is None:
        del record[key]
    else:
        record[key] = value
    records = {k: v for k, v in content.items() if k != section}
    kind = MetricRecord if section == protocol.METRICS else ConfigRecord
    return RecordDict({**records, section: kind(record)})


@pytest.mark.parametrize(
    "section, key, value, problem",
    [
        (protocol.METRICS, "sum", None, "statistics reply's sum is missing"),
        (protocol.METRICS, "sum", [1.0, math.nan], "statistics reply's sum is not a list of finite numbers"),
        (protocol.METRICS, "sum", [1.0], "statistics reply's sum does not have one value per feature"),
        (protocol.METRICS, "second", [1.0], "statistics reply's second does not have one value per feature"),
        (protocol.METRICS, "observed", None, "statistics reply's observed is missing"),
        (protocol.METRICS, "noise-std", -1.0, "statistics reply's noise-std is negative"),
        (protocol.METRICS, "num-examples", math.inf, "statistics reply's num-examples is not a finite number"),
        (protocol.METRICS, "epsilon", math.nan, "statistics reply's epsilon is not a finite number"),
        (protocol.HOSPITAL, "name", None, "statistics reply's name is missing"),
        (protocol.HOSPITAL, "stats/delta", "tiny", "statistics reply's stats/delta is not a finite number"),
        ("features", "task", None, "statistics reply's features's task is missing"),
        ("features", "input-shape", [2.5], "statistics reply's features's input-shape is not a list of whole numbers"),
        ("features", "bounds-hi", [1.0], "bounds-lo and bounds-hi do not have one bound per feature name"),
    ],
)
def test_a_malformed_statistics_reply_names_the_message_and_field(section, key, value, problem) -> None:
    with pytest.raises(FedcareError, match=problem):
        StatsReply.decode(_stats_with(section, key, value))


def test_a_missing_record_or_malformed_field_in_any_message_is_a_fedcare_error() -> None:
    content = STATS.encode()
    with pytest.raises(FedcareError, match="statistics reply's features record is missing"):
        StatsReply.decode(RecordDict({k: v for k, v in content.items() if k != "features"}))
    with pytest.raises(FedcareError, match="refusal's kind is not text"):
        Refusal.from_content(RecordDict({protocol.REFUSAL: ConfigRecord({"reason": "x", "kind": 3})}))
    with pytest.raises(FedcareError, match="refusal's reason is missing"):
        Refusal.from_content(RecordDict({protocol.REFUSAL: ConfigRecord({"kind": "data"})}))
    with pytest.raises(FedcareError, match="evaluation reply's tp is not a whole number"):
        EvaluationMetrics.from_record(EVAL.to_record() | {"tp": 2.5})
    with pytest.raises(FedcareError, match="evaluation reply's neg-hist is missing"):
        EvaluationMetrics.from_record({k: v for k, v in EVAL.to_record().items() if k != "neg-hist"})
    with pytest.raises(FedcareError, match="train reply's trained/epsilon is not a finite number"):
        TrainReport.from_record(TRAINED.to_record() | {"trained/epsilon": math.nan})
    with pytest.raises(FedcareError, match="train reply's trained/replanned-from-round is missing"):
        TrainReport.from_record({"trained/planned-noise-multiplier": 1.0, "trained/noise-multiplier": 1.2})
    with pytest.raises(FedcareError, match="run request's norm-mean is not a list of finite numbers"):
        ModelInputs.from_config({"norm-mean": [math.nan], "norm-std": [1.0]})
    with pytest.raises(FedcareError, match="run request's norm-std is missing"):
        ModelInputs.from_config({"norm-mean": [0.0]})
    with pytest.raises(FedcareError, match="run request's norm-std does not have one value per norm-mean"):
        ModelInputs.from_config({"norm-mean": [0.0], "norm-std": [1.0, 2.0]})
    with pytest.raises(FedcareError, match="key-agreement request's threshold is not a whole number"):
        KeyAgreementRequest.from_payload({"threshold": 2.5, "neighbours": 3, "nodes": [1, 2, 3]})
    with pytest.raises(FedcareError, match="key-agreement request's nodes is missing"):
        KeyAgreementRequest.from_payload({"threshold": 2, "neighbours": 3})
    with pytest.raises(FedcareError, match="unmask request's round is not a whole number"):
        UnmaskRequest.from_payload({"round": "one", "path": "fast"})
    with pytest.raises(FedcareError, match="hospital record's name is not text"):
        hospital_name(RecordDict({protocol.HOSPITAL: ConfigRecord({"name": 7})}))


def test_a_diverged_models_test_loss_is_reported_not_refused() -> None:
    assert math.isnan(EvaluationMetrics.from_record(EVAL.to_record() | {"loss-sum": math.nan}).loss_sum)


def test_fields_unknown_to_this_version_are_ignored() -> None:
    """The stated rule: a newer peer's extra fields are ignored; only known fields are read and trusted."""
    content = _stats_with(protocol.HOSPITAL, "stats/newer-field", "x")
    content = RecordDict({**dict(content.items()), "newer-record": ConfigRecord({"a": 1})})
    assert StatsReply.decode(content) == STATS
    assert EvaluationMetrics.from_record(EVAL.to_record() | {"auc-newer": 0.5}) == EVAL
    assert TrainReport.from_record(TRAINED.to_record() | {"trained/newer": 1}) == TRAINED
    assert ModelInputs.from_config({"norm-mean": [0.0], "norm-std": [1.0], "dataset": "x"}) == ModelInputs([0.0], [1.0])
    newer_kind = RecordDict({protocol.REFUSAL: ConfigRecord({"reason": "x", "kind": "newer-kind"})})
    assert Refusal.from_content(newer_kind) == Refusal("x", "newer-kind")  # named as sent, acted on as not budget


def test_a_hospital_refuses_a_normalisation_that_is_not_finite(tmp_path) -> None:
    """The coordinator's norm-mean/norm-std are decoded and checked at the hospital: a NaN is refused by
    field name (before: the hospital trained on NaN inputs and released the update)."""
    from flwr.app import Context, Message

    from client.client_app import make_client_app
    from client.datasets.fed_heart_disease import load_center
    from fedcare.run_config import RunSettings
    from server.federation_loop import training_config
    from shared_models.registry import build_model
    from shared_models.weights import model_to_arrays, pack_arrays
    from tests.support.inprocess_grid import RUN_ID

    k = len(load_center(0).numeric_features)
    config = training_config(RunSettings(secure_aggregation=False, dp=False)) | {
        "server-round": 1,
        "norm-mean": [math.nan] * k,
        "norm-std": [1.0] * k,
    }
    content = RecordDict(
        {
            protocol.CONFIG: ConfigRecord(config),
            protocol.MODEL: pack_arrays(model_to_arrays(build_model("logistic", load_center(0).input_shape))),
        }
    )
    node = {"partition-id": 0, "ledger-dir": str(tmp_path), "require-dp": False, "require-secure-aggregation": False}
    reply = make_client_app()(
        Message(content, dst_node_id=100, message_type="train"), Context(RUN_ID, 100, node, RecordDict(), {})
    )
    refusal = Refusal.from_content(reply.content)
    assert refusal is not None and "run request's norm-mean is not a list of finite numbers" in refusal.reason
    assert protocol.ARRAYS not in reply.content.array_records


def test_the_coordinator_refuses_a_malformed_statistics_reply_by_name(tmp_path) -> None:
    """A statistics reply with a NaN sum stops the run with the field named (before: the NaN poisoned
    the pooled normalisation every hospital then trained with)."""
    from fedcare.run_config import RunSettings
    from server.federation_loop import run_federation
    from tests.support.inprocess_grid import RUN_ID, InProcessGrid, node_configs

    class NaNStatsGrid(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = super().send_and_receive(messages, timeout)
            if messages and messages[0].metadata.message_type == protocol.FEATURE_STATS:
                metrics = replies[0].content.metric_records[protocol.METRICS]
                metrics["sum"] = [math.nan] * len(list(metrics["sum"]))
            return replies

    s = RunSettings(num_rounds=1, hospitals=2, min_hospitals=2, output_dir=str(tmp_path / "out"))
    with pytest.raises(FedcareError, match="statistics reply's sum is not a list of finite numbers"):
        run_federation(
            NaNStatsGrid(node_configs(tmp_path, [1.0] * 2)), s, 2, lambda line: None, timeout=5, run_id=RUN_ID
        )
