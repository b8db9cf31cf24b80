"""Typed wire messages: each exchange's request and reply, encoded and decoded here only.

The record keys are ``fedcare.protocol``'s and unchanged, so a node and a server of this version
talk exactly as before. What changes is who reads them: the ClientApp and the round loop build and
take these dataclasses and never index a record by string.

Decoding checks every field's presence and type (a number must be finite: NaN or inf slips past
every comparison) and raises ``FedcareError`` naming the message and the field, never a KeyError.
Rule for unknown fields: they are ignored. A newer peer may add fields; an older reader takes what
it knows (as ``RunRequest.from_config`` does for the run config), and only what it knows is trusted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcare import protocol
from fedcare.errors import FedcareError
from shared_models.classification_metrics import BinarySummary

# the statistics release's component weights (client/feature_stats.py releases, server/feature_statistics.py pools)
STATS_SECOND_WEIGHT = 2.0  # second moment: 2 (u^2 - 1/8), in [-1/4, 1/4]
STATS_OBSERVED_WEIGHT = 0.5  # observed count: 1/2 per observed value

TRAIN_LOSS = "train-loss"  # a plain train reply's metric (without DP): the strategy averages it
_MISSING = object()
_WHAT = {
    "str": "text",
    "int": "a whole number",
    "float": "a finite number",
    "bool": "true or false",
    "number": "a number",
    "floats": "a list of finite numbers",
    "ints": "a list of whole numbers",
    "strs": "a list of texts",
}


def _bad(message: str, key: str, problem: str) -> FedcareError:
    return FedcareError(
        f"the {message}'s {key} {problem}",
        "the sender runs a different or modified fedcare: use the same fedcare version everywhere",
    )


def _number(value: Any, kind: str) -> Any:
    """``value`` as an int or finite float; ValueError when it is not one (bools and text are not numbers)."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(value)
    if kind == "int":
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise ValueError(value)
        return int(value)
    if not math.isfinite(float(value)):
        raise ValueError(value)
    return float(value)


def _convert(value: Any, kind: str) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(value)
        return bool(value)
    if kind in ("int", "float"):
        return _number(value, kind)
    if kind == "number":  # any float, NaN included: a diverged model's test loss is reported, not refused
        if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(value)
        return float(value)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(value)
    item = {"floats": "float", "ints": "int", "strs": "str"}[kind]
    return [_convert(v, item) for v in value]


def read(record: Mapping[str, Any], key: str, kind: str, message: str, default: Any = _MISSING) -> Any:
    """``record[key]`` as ``kind``; ``default`` when absent (no default: the field is required)."""
    if key not in record:
        if default is _MISSING:
            raise _bad(message, key, "is missing")
        return default
    try:
        return _convert(record[key], kind)
    except (ValueError, TypeError):
        raise _bad(message, key, f"is not {_WHAT[kind]}") from None


def hospital_name(content: RecordDict) -> str | None:
    """The name in a reply's hospital record (None when the reply has none: it is then named by node)."""
    record = content.config_records.get(protocol.HOSPITAL)
    if record is None or "name" not in record:
        return None
    return read(record, "name", "str", "reply's hospital record")


def reply_sender(msg: Message, sent: list[Message]) -> int:
    """The node a reply stands for. Flower's SuperLink answers by itself for a node that stopped sending
    heartbeats (an error reply from node 1, ``SUPERLINK_NODE_ID``): that reply is the node's, found by the
    message it replies to."""
    node = msg.metadata.src_node_id
    if node not in {m.metadata.dst_node_id for m in sent}:
        node = next(
            (
                m.metadata.dst_node_id
                for m in sent
                if m.metadata.message_id and m.metadata.message_id == msg.metadata.reply_to_message_id
            ),
            node,
        )
    return node


def hospital_record(name: str, *reports: Mapping[str, Any]) -> ConfigRecord:
    """A reply's hospital record: the hospital's name and its reports (each already prefixed)."""
    merged: dict[str, Any] = {"name": name}
    for report in reports:
        merged.update(report)
    return ConfigRecord(merged)


# ---- in every reply --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Refusal:
    """A hospital declines: one line saying why, and what kind of reason (budget, policy, ledger, data)."""

    reason: str
    kind: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"reason": self.reason, "kind": self.kind})

    @classmethod
    def from_content(cls, content: RecordDict) -> Refusal | None:
        """The refusal a reply carries, or None when it carries none."""
        record = content.config_records.get(protocol.REFUSAL)
        if record is None:
            return None
        # any text: a newer hospital may name a kind this version does not know (only "budget" is acted on)
        return cls(read(record, "reason", "str", "refusal"), read(record, "kind", "str", "refusal"))


@dataclasses.dataclass(frozen=True)
class PrivacyNote:
    """A hospital's statement about one release: the delta it accounts at, and whether its noise was secret."""

    delta: float | None = None
    private_noise: bool = True

    def to_record(self, prefix: str) -> dict[str, Any]:
        record: dict[str, Any] = {f"{prefix}delta": self.delta} if self.delta is not None else {}
        if not self.private_noise:
            record[f"{prefix}not-private"] = True
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any], prefix: str, message: str) -> PrivacyNote:
        return cls(
            read(record, f"{prefix}delta", "float", message, None),
            not read(record, f"{prefix}not-private", "bool", message, False),
        )


# ---- statistics exchange (protocol.FEATURE_STATS) ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """What a hospital's data looks like: numeric feature names and bounds, model input shape, task."""

    names: tuple[str, ...]
    bounds_lo: tuple[float, ...]
    bounds_hi: tuple[float, ...]
    input_shape: tuple[int, ...]
    task: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "names": list(self.names),
                "input-shape": list(self.input_shape),
                "task": self.task,
                "bounds-lo": list(self.bounds_lo),
                "bounds-hi": list(self.bounds_hi),
            }
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FeatureSchema:
        what = "statistics reply's features"
        names = tuple(read(record, "names", "strs", what))
        lo = tuple(read(record, "bounds-lo", "floats", what))
        hi = tuple(read(record, "bounds-hi", "floats", what))
        if not len(names) == len(lo) == len(hi):
            raise _bad(what, "bounds-lo", "and bounds-hi do not have one bound per feature name")
        return cls(names, lo, hi, tuple(read(record, "input-shape", "ints", what)), read(record, "task", "str", what))


@dataclasses.dataclass(frozen=True)
class StatsReply:
    """A hospital's answer to the statistics round: (noisy) per-feature sums of the value, its second
    moment and its observed count (client/feature_stats.py), the noise on each sum, its public size,
    its schema."""

    hospital: str
    sums: list[float]
    second: list[float]
    observed: list[float]
    noise_std: float
    num_examples: float
    schema: FeatureSchema
    epsilon: float | None = None  # the hospital's spent epsilon (with DP only)
    privacy: PrivacyNote = PrivacyNote()

    PREFIX = "stats/"

    def encode(self) -> RecordDict:
        metrics: dict[str, Any] = {} if self.epsilon is None else {"epsilon": self.epsilon}
        metrics |= {
            "sum": list(self.sums),
            "second": list(self.second),
            "observed": list(self.observed),
            "noise-std": float(self.noise_std),
            protocol.NUM_EXAMPLES: self.num_examples,
        }
        return RecordDict(
            {
                protocol.HOSPITAL: hospital_record(self.hospital, self.privacy.to_record(self.PREFIX)),
                protocol.METRICS: MetricRecord(metrics),
                "features": self.schema.to_record(),
            }
        )

    @classmethod
    def decode(cls, content: RecordDict) -> StatsReply:
        what = "statistics reply"
        for records, key in (
            (content.config_records, protocol.HOSPITAL),
            (content.metric_records, protocol.METRICS),
            (content.config_records, "features"),
        ):
            if key not in records:
                raise _bad(what, f"{key} record", "is missing")
        metrics = content.metric_records[protocol.METRICS]
        schema = FeatureSchema.from_record(content.config_records["features"])
        sums = {key: read(metrics, key, "floats", what) for key in ("sum", "second", "observed")}
        for key, values in sums.items():
            if len(values) != len(schema.names):
                raise _bad(what, key, "does not have one value per feature")
        noise_std = read(metrics, "noise-std", "float", what)
        if noise_std < 0:
            raise _bad(what, "noise-std", "is negative")
        hospital = content.config_records[protocol.HOSPITAL]
        return cls(
            read(hospital, "name", "str", what),
            sums["sum"],
            sums["second"],
            sums["observed"],
            noise_std,
            read(metrics, protocol.NUM_EXAMPLES, "float", what),
            schema,
            read(metrics, "epsilon", "float", what, None),
            PrivacyNote.from_record(hospital, cls.PREFIX, what),
        )


# ---- train and evaluate requests (server -> node, besides the RunRequest) -----------------------
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """What a train or evaluate message adds to the run request: the pooled normalisation, and whether
    to test the received model before training on it (the previous round's evaluation)."""

    norm_mean: list[float]
    norm_std: list[float]
    evaluate_incoming: bool = False
    personalise: bool = False  # the final model: adapt it locally (personalise-rounds) before testing

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"norm-mean": list(self.norm_mean), "norm-std": list(self.norm_std)}
        if self.evaluate_incoming:
            config[protocol.EVALUATE_INCOMING] = True
        if self.personalise:
            config["personalise"] = True
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelInputs:
        what = "run request"
        mean = read(config, "norm-mean", "floats", what)
        std = read(config, "norm-std", "floats", what)
        if len(mean) != len(std):
            raise _bad(what, "norm-std", "does not have one value per norm-mean value")
        return cls(
            mean,
            std,
            read(config, protocol.EVALUATE_INCOMING, "bool", what, False),
            read(config, "personalise", "bool", what, False),
        )


# ---- evaluation (an evaluate reply's metrics, or a train reply's evaluation/ keys) ---------------
@dataclasses.dataclass(frozen=True)
class EvaluationMetrics:
    """A hospital's test of a model: confusion matrix, loss sum, score histograms by label, test size."""

    tp: int
    fp: int
    tn: int
    fn: int
    loss_sum: float
    pos_hist: list[int]
    neg_hist: list[int]
    num_examples: int
    dice_sum: float = 0.0  # segmentation tests only (absent from a classification reply)
    dice_n: int = 0
    hd95_sum: float = 0.0
    hd95_n: int = 0

    _KEYS = (
        ("tp", "int"),
        ("fp", "int"),
        ("tn", "int"),
        ("fn", "int"),
        ("loss-sum", "number"),
        ("pos-hist", "ints"),
        ("neg-hist", "ints"),
        (protocol.NUM_EXAMPLES, "int"),
    )
    _SEGMENTATION_KEYS = (("dice-sum", "number"), ("dice-n", "int"), ("hd95-sum", "number"), ("hd95-n", "int"))

    def to_record(self, prefix: str = "") -> dict[str, Any]:
        values = dataclasses.astuple(self)
        keys = self._KEYS + (self._SEGMENTATION_KEYS if self.dice_n else ())
        return {f"{prefix}{key}": value for (key, _), value in zip(keys, values)}

    @classmethod
    def from_record(
        cls, record: Mapping[str, Any], prefix: str = "", message: str = "evaluation reply"
    ) -> EvaluationMetrics:
        required = [read(record, f"{prefix}{key}", kind, message) for key, kind in cls._KEYS]
        segmentation = [read(record, f"{prefix}{key}", kind, message, 0) for key, kind in cls._SEGMENTATION_KEYS]
        return cls(*required, *segmentation)

    @classmethod
    def from_summary(cls, s: BinarySummary) -> EvaluationMetrics:
        return cls(
            int(s.tp),
            int(s.fp),
            int(s.tn),
            int(s.fn),
            float(s.loss_sum),
            cast(np.ndarray, s.pos_hist).tolist(),
            cast(np.ndarray, s.neg_hist).tolist(),
            int(s.n),
            float(s.dice_sum),
            int(s.dice_n),
            float(s.hd95_sum),
            int(s.hd95_n),
        )

    def summary(self) -> BinarySummary:
        return BinarySummary(
            tp=self.tp,
            fp=self.fp,
            tn=self.tn,
            fn=self.fn,
            loss_sum=self.loss_sum,
            pos_hist=np.asarray(self.pos_hist, dtype=np.int64),
            neg_hist=np.asarray(self.neg_hist, dtype=np.int64),
            dice_sum=self.dice_sum,
            dice_n=self.dice_n,
            hd95_sum=self.hd95_sum,
            hd95_n=self.hd95_n,
        )

    @classmethod
    def in_train_reply(cls, content: RecordDict) -> EvaluationMetrics | None:
        """The received model's test a train reply carries in its hospital record (None: none)."""
        record: Mapping[str, Any] = content.config_records.get(protocol.HOSPITAL, {})
        if not any(key.startswith(protocol.EVALUATION) for key in record):
            return None
        return cls.from_record(record, protocol.EVALUATION, "train reply's evaluation")

    @classmethod
    def personalised_in(cls, content: RecordDict) -> EvaluationMetrics | None:
        """The personalised model's test a final evaluate reply carries (None: none)."""
        record: Mapping[str, Any] = content.config_records.get(protocol.HOSPITAL, {})
        if not any(key.startswith(protocol.PERSONALISED) for key in record):
            return None
        return cls.from_record(record, protocol.PERSONALISED, "evaluate reply's personalised evaluation")

    @classmethod
    def in_evaluate_reply(cls, content: RecordDict) -> EvaluationMetrics | None:
        """An evaluate reply's metrics (None: the hospital's policy withholds them)."""
        record = content.metric_records.get(protocol.METRICS)
        return None if record is None else cls.from_record(record)


def personalised_epsilon(content: RecordDict) -> float | None:
    """The epsilon a hospital reports after personalising the final model (None: it did not, or no DP)."""
    record: Mapping[str, Any] = content.config_records.get(protocol.HOSPITAL, {})
    return read(record, protocol.PERSONALISED_EPSILON, "float", "evaluate reply", None)


# ---- train reply (node -> server): the hospital's report on its training -------------------------
@dataclasses.dataclass(frozen=True)
class TrainReport:
    """What a hospital says about its training, under ``trained/`` in its hospital record (not the
    MetricRecord, which holds only what the strategy aggregates)."""

    train_seconds: float | None = None
    epsilon: float | None = None
    noise_multiplier: float | None = None
    steps: int | None = None
    planned_noise_multiplier: float | None = None  # set when the hospital re-planned after a crash
    replanned_from_round: int | None = None
    lost_rounds: list[int] = dataclasses.field(default_factory=list)
    privacy: PrivacyNote = PrivacyNote()

    _KEYS = (
        ("train_seconds", "float"),
        ("epsilon", "float"),
        ("noise_multiplier", "float"),
        ("steps", "int"),
        ("planned_noise_multiplier", "float"),
        ("replanned_from_round", "int"),
    )

    def to_record(self) -> dict[str, Any]:
        record = {
            f"{protocol.TRAINED}{name.replace('_', '-')}": getattr(self, name)
            for name, _ in self._KEYS
            if getattr(self, name) is not None
        }
        if self.lost_rounds:
            record[f"{protocol.TRAINED}lost-rounds"] = list(self.lost_rounds)
        return record | self.privacy.to_record(protocol.TRAINED)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainReport:
        what = "train reply"
        values = {
            name: read(record, f"{protocol.TRAINED}{name.replace('_', '-')}", kind, what, None)
            for name, kind in cls._KEYS
        }
        if values["planned_noise_multiplier"] is not None:  # a re-plan names its round and new noise
            for name, kind in cls._KEYS:
                if name in ("replanned_from_round", "noise_multiplier"):
                    read(record, f"{protocol.TRAINED}{name.replace('_', '-')}", kind, what)
        return cls(
            **values,
            lost_rounds=read(record, f"{protocol.TRAINED}lost-rounds", "ints", what, []),
            privacy=PrivacyNote.from_record(record, protocol.TRAINED, what),
        )


def plain_update(content: RecordDict) -> ArrayRecord:
    """A plain (not secure-aggregated) train reply's update."""
    if protocol.ARRAYS not in content.array_records:
        raise _bad("train reply", f"{protocol.ARRAYS} record", "is missing")
    return content.array_records[protocol.ARRAYS]


# ---- train and evaluate messages: the model, and a plain train reply --------------------------------
def received_model(content: RecordDict) -> ArrayRecord:
    """The global model a train or evaluate message carries (packed by the server; an ArrayRecord also works)."""
    from shared_models.weights import unpack_arrays

    if protocol.MODEL in content.config_records:
        return unpack_arrays(content.config_records[protocol.MODEL])
    if protocol.ARRAYS not in content.array_records:
        raise _bad("train or evaluate request", "model", "is missing")
    return content.array_records[protocol.ARRAYS]


def asks_secure_update(config: Mapping[str, Any]) -> bool:
    """Whether a train message's config carries a secure-aggregation request (the update must be masked)."""
    return any(key.startswith(protocol.SECAGG) for key in config)


def plain_train_reply(update: ArrayRecord, num_examples: float, train_loss: float | None = None) -> dict[str, Any]:
    """The records of a train reply without secure aggregation: the update and what the strategy
    aggregates (its weight; the training loss only without DP)."""
    metrics: dict[str, Any] = {protocol.NUM_EXAMPLES: num_examples}
    if train_loss is not None:
        metrics[TRAIN_LOSS] = train_loss
    return {protocol.ARRAYS: update, protocol.METRICS: MetricRecord(metrics)}


def aggregated_train_loss(metrics: Mapping[str, Any] | None) -> float | None:
    """The strategy's weighted mean of the hospitals' training losses (None: none was reported)."""
    if metrics is None:
        return None
    return read(metrics, TRAIN_LOSS, "number", "aggregated train metrics", None)


def evaluation_withheld() -> dict[str, Any]:
    """An evaluate reply's hospital-record entry: the hospital's policy releases no evaluation."""
    return {protocol.EVALUATION_WITHHELD: True}
