"""A hospital's own policy decides what it joins, whatever the coordinator's run config says.

Each attack from the review is a run the coordinator may launch: DP off, a federation too small,
a secure-aggregation threshold a minority can meet, a clip range wider than the hospital allows,
a train request that silently drops the masking, no budget at all. Every one is refused by the
node in its own code, with a reason naming the rule and the request, recorded in the hospital's
audit log and reported by name by the coordinator.
"""

from __future__ import annotations

import json

import pytest

from client.node_policy import NodePolicy, PolicyRefusal
from fedcare import protocol
from fedcare.errors import FedcareError
from fedcare.protocol import RunRequest
from fedcare.run_config import RunSettings
from server.federation_loop import run_federation
from tests.support.inprocess_grid import RUN_ID, InProcessGrid, task_identity  # noqa: F401

STRICT = {"require-dp": True, "require-secure-aggregation": True, "min-hospitals": 3}


def _strict_nodes(tmp_path, **policy):
    """Four heart hospitals; Hungary (partition 1) holds the policy under test, the others accept anything."""
    nodes = {}
    for i in range(4):
        config = {"partition-id": i, "ledger-dir": str(tmp_path / "ledgers"), "epsilon-budget": 5.0}
        config |= (
            (STRICT | policy)
            if i == 1
            else {
                "require-dp": False,
                "require-secure-aggregation": False,
                "min-hospitals": 2,
                "max-secagg-clip-range": 1000.0,
            }
        )
        nodes[100 + i] = config
    return nodes


def _audit_refusals(tmp_path, hospital: str) -> list[dict]:
    path = tmp_path / "ledgers" / "audit" / f"{hospital.replace(' ', '-')}.jsonl"
    return [json.loads(line)["body"] for line in path.read_text().splitlines() if json.loads(line)["kind"] == "refusal"]


@pytest.mark.parametrize(
    "run, rule",
    [
        (dict(dp=False), "requires DP, the run has dp=false"),
        (dict(secure_aggregation=False), "requires secure aggregation, the run has secure-aggregation=false"),
        (
            dict(secagg_clip_range=50.0),
            "accepts a secure-aggregation clip range of at most 10, the run has secagg-clip-range=50",
        ),
        (dict(hospitals=2, min_hospitals=2), "joins federations of at least 3 hospitals, the run has hospitals=2"),
    ],
)
def test_a_run_outside_the_policy_is_refused_by_the_node_and_reported_by_name(tmp_path, run, rule):
    s = RunSettings(num_rounds=1, **run)
    progress: list[str] = []
    expected = run.get("hospitals", 4)
    nodes = dict(list(_strict_nodes(tmp_path).items())[:expected]) if expected < 4 else _strict_nodes(tmp_path)
    result = run_federation(InProcessGrid(nodes), s, expected, progress.append, timeout=5, run_id=RUN_ID)
    hungary = next(h for h in result.hospitals.values() if h.name == "Hungary")
    assert not hungary.active and hungary.refusal_kind == "policy"
    assert hungary.refusal.startswith(f"Hungary refuses: {rule}")
    assert any(line.startswith(f"statistics: Hungary refuses: {rule}") for line in progress), progress
    assert all("Hungary" not in r.trained for r in result.rounds)
    logged = _audit_refusals(tmp_path, "Hungary")
    assert logged and logged[0]["kind"] == "policy" and rule in logged[0]["reason"]
    # nothing was released: no statistics answer, no ledger
    assert not list((tmp_path / "ledgers").glob("privacy-ledger-*Hungary*.json"))


def test_a_threshold_a_minority_can_meet_is_refused_at_key_agreement(tmp_path):
    """fedcare's own server never sends t <= n/2; a coordinator running its own code can. The node refuses."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.client_app import make_client_app
    from secure_aggregation.records import flatten
    from server.federation_loop import training_config

    config = training_config(RunSettings(num_rounds=1)) | flatten(
        {"threshold": 2, "neighbours": 3, "nodes": [100, 101, 102, 103]}, protocol.SECAGG
    )
    node = _strict_nodes(tmp_path, **{"min-secagg-threshold": 3})[101]
    reply = make_client_app()(
        Message(
            RecordDict({protocol.CONFIG: ConfigRecord(config)}), dst_node_id=101, message_type=protocol.SECAGG_ADVERTISE
        ),
        Context(RUN_ID, 101, node, RecordDict(), {}),
    )
    refusal = reply.content.config_records[protocol.REFUSAL]
    assert refusal["kind"] == "policy"
    assert refusal["reason"].startswith(
        "Hungary refuses: accepts a secure-aggregation threshold of at least 3, "
        "the run has t=2; requires a threshold above half the hospitals, "
        "the run has t=2 of n=4"
    )
    assert not any(key.startswith(protocol.SECAGG) for key in reply.content.config_records[protocol.HOSPITAL])
    assert any("threshold" in r["reason"] for r in _audit_refusals(tmp_path, "Hungary"))


def test_a_train_request_that_drops_the_promised_masking_is_refused(tmp_path):
    """The server announces secure aggregation, then sends Hungary a plain train request."""

    class StrippingGrid(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            for msg in messages:
                if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 101:
                    config = {
                        k: v for k, v in msg.content[protocol.CONFIG].items() if not k.startswith(protocol.SECAGG)
                    }
                    from flwr.app import ConfigRecord, RecordDict

                    msg.content = RecordDict({**dict(msg.content.items()), protocol.CONFIG: ConfigRecord(config)})
            return super().send_and_receive(messages, timeout)

    s = RunSettings(num_rounds=1)
    result = run_federation(StrippingGrid(_strict_nodes(tmp_path)), s, 4, lambda _: None, timeout=5, run_id=RUN_ID)
    assert (
        "requires secure aggregation, the train request carries no masking request"
        in result.rounds[0].refused["Hungary"]
    )


def test_a_node_without_a_budget_refuses_dp_training(tmp_path):
    nodes = _strict_nodes(tmp_path)
    del nodes[101]["epsilon-budget"]
    result = run_federation(
        InProcessGrid(nodes), RunSettings(num_rounds=1), 4, lambda _: None, timeout=5, run_id=RUN_ID
    )
    hungary = next(h for h in result.hospitals.values() if h.name == "Hungary")
    assert "its policy sets no epsilon-budget" in hungary.refusal


def test_a_run_epsilon_above_the_hospitals_per_run_limit_is_refused(tmp_path):
    result = run_federation(
        InProcessGrid(_strict_nodes(tmp_path, **{"max-run-epsilon": 0.5})),
        RunSettings(num_rounds=1, target_epsilon=1.0),
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    hungary = next(h for h in result.hospitals.values() if h.name == "Hungary")
    assert "allows at most epsilon 0.5 per run, the run asks target-epsilon=1" in hungary.refusal


def test_a_hospital_that_releases_no_evaluation_still_trains_and_sends_no_metrics(tmp_path):
    result = run_federation(
        InProcessGrid(_strict_nodes(tmp_path, **{"release-evaluation": "none"})),
        RunSettings(num_rounds=2),
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    assert all("Hungary" in r.trained for r in result.rounds)
    assert all("Hungary" not in r.evaluation and "Cleveland" in r.evaluation for r in result.rounds)


def test_the_coordinator_cannot_slip_policy_into_the_run_config(tmp_path):
    """Hospital-owned keys in the run config or the message config change nothing at the node."""
    grid = InProcessGrid(_strict_nodes(tmp_path), run_config={"require-dp": False, "epsilon-budget": 99.0})
    result = run_federation(grid, RunSettings(num_rounds=1, dp=False), 4, lambda _: None, timeout=5, run_id=RUN_ID)
    hungary = next(h for h in result.hospitals.values() if h.name == "Hungary")
    assert "requires DP, the run has dp=false" in hungary.refusal


def test_policy_values_are_checked_and_named():
    with pytest.raises(FedcareError, match="hospital policy min-hospitals: 1 is below 2"):
        NodePolicy.from_settings({"min-hospitals": 1})
    with pytest.raises(FedcareError, match="release-evaluation: 'some' is not one of per-hospital, none"):
        NodePolicy.from_settings({"release-evaluation": "some"})
    with pytest.raises(FedcareError, match="require-dp: 'maybe' is not a bool"):
        NodePolicy.from_settings({"require-dp": "maybe"})
    policy = NodePolicy.from_settings({"epsilon-budget": 1.0})
    assert policy.require_dp and policy.require_secure_aggregation and policy.min_hospitals == 3
    with pytest.raises(PolicyRefusal, match=r"^X refuses: requires DP"):
        policy.check_request("X", RunRequest(dataset="d", dp=False, hospitals=5))
    policy.check_request("X", RunRequest(dataset="d", hospitals=5))


def test_a_malformed_run_request_is_refused_not_guessed():
    """A text "false" is false (not Python's truthy string); a value of the wrong type, or a
    non-finite epsilon that would slip past every comparison, is refused with what to fix."""
    assert RunRequest.from_config({"dataset": "d", "dp": "false"}).dp is False
    for bad, field_name in [
        ({"target-epsilon": float("nan")}, "target-epsilon"),
        ({"hospitals": "many"}, "hospitals"),
        ({"dp": "maybe"}, "dp"),
    ]:
        with pytest.raises(FedcareError, match=f"run request's {field_name} is not"):
            RunRequest.from_config({"dataset": "d", **bad})
