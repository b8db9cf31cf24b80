"""The coordinator's loop against real ClientApps, routed in-process (no Ray): refusals, stops."""

from __future__ import annotations

from collections import Counter

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from client.datasets.fed_heart_disease import load_center
from fedcare.run_config import RunSettings
from server.federation_loop import run_federation
from tests.support.hospital_state import spend
from tests.support.inprocess_grid import RUN_ID, InProcessGrid, node_configs, task_identity  # noqa: F401


def _exhaust(tmp_path, partition):
    data = load_center(partition)
    spend(tmp_path / "ledgers", data.name, f"fed-heart-disease:{data.name}", [(0.5, 0.1, 400)])


def test_a_hospital_out_of_budget_is_reported_by_name_and_the_others_carry_on(tmp_path):
    _exhaust(tmp_path, 2)
    progress = []
    s = RunSettings(num_rounds=2, min_hospitals=2, output_dir=str(tmp_path / "out"))
    result = run_federation(
        InProcessGrid(node_configs(tmp_path, [1.0] * 4)), s, 4, progress.append, timeout=5, run_id=RUN_ID
    )
    assert len(result.rounds) == 2 and result.stopped_early is None
    swiss = next(h for h in result.hospitals.values() if h.name == "Switzerland")
    assert not swiss.active and "Switzerland: budget 1.00 exhausted after round 12" in swiss.refusal
    assert any("Switzerland: budget 1.00 exhausted after round 12" in line for line in progress)
    assert sorted(result.rounds[-1].trained) == ["Cleveland", "Hungary", "VA Long Beach"]
    for h in result.hospitals.values():
        if h.active:
            assert 0.9 < h.epsilon <= 1.0 + 1e-9  # the whole plan was spent, not more
    for record in result.rounds:  # still evaluated every round (an evaluate message in the train exchange)
        assert "Switzerland" in record.evaluation


def test_the_run_stops_cleanly_when_too_few_hospitals_can_train(tmp_path):
    for p in (0, 1, 3):
        _exhaust(tmp_path, p)
    progress = []
    s = RunSettings(num_rounds=2, min_hospitals=2)
    result = run_federation(
        InProcessGrid(node_configs(tmp_path, [1.0] * 4)), s, 4, progress.append, timeout=5, run_id=RUN_ID
    )
    assert result.rounds == []
    assert result.stopped_early.startswith("only 1 hospital(s) can train (min-hospitals=2)")


def test_node_budget_caps_the_coordinators_target(tmp_path):
    s = RunSettings(num_rounds=2, target_epsilon=1.0)
    # a coordinator slipping a budget into the run config changes nothing: budgets are node-owned
    grid = InProcessGrid(node_configs(tmp_path, [0.5, 1.0, 1.0, 1.0]), run_config={"epsilon-budget": 10.0})
    result = run_federation(grid, s, 4, lambda _: None, timeout=5, run_id=RUN_ID)
    eps = {h.name: h.epsilon for h in result.hospitals.values()}
    assert eps["Cleveland"] == pytest.approx(0.5, abs=0.01) and eps["Cleveland"] <= 0.5 + 1e-9
    assert eps["Hungary"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_without_dp_no_ledger_is_written(tmp_path, strategy):
    s = RunSettings(num_rounds=1, dp=False, strategy=strategy, secure_aggregation=False)
    result = run_federation(
        InProcessGrid(node_configs(tmp_path, [1.0] * 4)), s, 4, lambda _: None, timeout=5, run_id=RUN_ID
    )
    assert result.rounds[0].train_loss is not None
    assert result.rounds[0].evaluation["pooled"]["n"] == 254
    assert all(h.epsilon is None for h in result.hospitals.values())
    assert not list((tmp_path / "ledgers").glob("privacy-ledger-*.json"))  # no DP: nothing to account
    assert len(list((tmp_path / "ledgers" / "audit").glob("*.jsonl"))) == 4  # releases are still logged


class RecordingGrid(InProcessGrid):
    """Keeps every exchange's message types and the train messages (the global model each carried)."""

    def __init__(self, node_configs):
        super().__init__(node_configs)
        self.exchanges: list[list[str]] = []
        self.train_messages: list[list[Message]] = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.exchanges.append(sorted({m.metadata.message_type for m in messages}))
        if any(m.metadata.message_type == "train" for m in messages):
            self.train_messages.append([m for m in messages if m.metadata.message_type == "train"])
        return super().send_and_receive(messages, timeout)


@pytest.mark.parametrize("secure", [False, True])
def test_each_model_is_evaluated_in_the_next_train_exchange_and_the_last_one_alone(tmp_path, secure):
    """One exchange fewer per round; the metrics are those of the model the round produced."""
    grid = RecordingGrid(node_configs(tmp_path, [1.0] * 4))
    s = RunSettings(num_rounds=3, dp=False, secure_aggregation=secure)
    result = run_federation(grid, s, 4, lambda _: None, timeout=5, run_id=RUN_ID)
    per_round = [["query.secagg_unmask"]] if secure else []  # nobody dropped: the fast path, one exchange
    setup = [["query.secagg_advertise"], ["query.secagg_share_keys"]] if secure else []
    end = [["query.secagg_end"]] if secure else []  # every hospital deletes its keys
    assert grid.exchanges == [["query.feature_stats"], *setup, *([["train"], *per_round] * 3), ["evaluate"], *end]
    # the model rides as one packed record, not an ArrayRecord of arrays and chunks (one wire object each)
    train = grid.train_messages[0][0]
    kinds = Counter(type(o).__name__ for o in get_all_nested_objects(train).values())
    assert kinds == Counter({"Message": 1, "RecordDict": 1, "ConfigRecord": 2})
    for record, next_train in zip(result.rounds, [*grid.train_messages[1:], None]):
        assert set(record.evaluation) == {"Cleveland", "Hungary", "Switzerland", "VA Long Beach", "pooled"}
        if next_train is None:
            continue
        # the model the next round started from, evaluated on its own, gives the reported metrics
        carried = next_train[0]
        ask = Message(
            RecordDict({"model": carried.content["model"], "config": carried.content["config"]}),
            dst_node_id=carried.metadata.dst_node_id,
            message_type="evaluate",
        )
        alone = InProcessGrid.send_and_receive(grid, [ask])[0].content.metric_records["metrics"]
        name = {100: "Cleveland", 101: "Hungary", 102: "Switzerland", 103: "VA Long Beach"}[
            carried.metadata.dst_node_id
        ]
        assert record.evaluation[name]["n"] == alone["num-examples"]
        assert record.evaluation[name]["accuracy"] == pytest.approx((alone["tp"] + alone["tn"]) / alone["num-examples"])
        assert record.evaluation[name]["loss"] == pytest.approx(alone["loss-sum"] / alone["num-examples"])


class FlakyGrid(InProcessGrid):
    """A node whose ClientApp crashes on its first training message (as Flower reports it)."""

    def __init__(self, node_configs, crash_node):
        super().__init__(node_configs)
        self.crash_node, self.crashed = crash_node, False

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            if (
                msg.metadata.message_type == "train"
                and msg.metadata.dst_node_id == self.crash_node
                and not self.crashed
            ):
                self.crashed = True
                replies.append(Message(Error(code=0, reason="ClientApp crashed: out of memory"), reply_to=msg))
            else:
                replies.extend(super().send_and_receive([msg], timeout))
        return replies


@pytest.mark.parametrize("secure", [False, True])
def test_a_node_that_fails_mid_round_is_reported_and_the_round_completes(tmp_path, secure):
    s = RunSettings(num_rounds=2, secure_aggregation=secure)
    progress = []
    result = run_federation(
        FlakyGrid(node_configs(tmp_path, [1.0] * 4), crash_node=101), s, 4, progress.append, timeout=5, run_id=RUN_ID
    )
    first, second = result.rounds
    assert first.failed == {"Hungary": "ClientApp crashed: out of memory"}
    assert sorted(first.trained) == ["Cleveland", "Switzerland", "VA Long Beach"]
    assert any(line.startswith("round  1/2") and "failed: Hungary" in line for line in progress)
    # Plain aggregation: a transient failure does not exclude the hospital. Secure aggregation:
    # the dropped node's round keys were revealed to unmask the others, so it stays out.
    assert len(second.trained) == (3 if secure else 4)
    # Hungary released nothing in round 1, so its ledger counts one round fewer than the others
    eps = {h.name: h.epsilon for h in result.hospitals.values()}
    assert eps["Hungary"] < eps["Cleveland"] - 0.01


@pytest.mark.parametrize("dp", [True, False])
def test_mlp_trains_federated_with_and_without_dp(tmp_path, dp):
    s = RunSettings(num_rounds=1, model="mlp", dp=dp)
    result = run_federation(
        InProcessGrid(node_configs(tmp_path, [1.0] * 4)), s, 4, lambda _: None, timeout=5, run_id=RUN_ID
    )
    assert set(result.arrays.keys()) == {
        "net.0.weight",
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
        "net.4.weight",
        "net.4.bias",
    }
    assert len(result.rounds[0].trained) == 4
