"""Secure aggregation inside the real round loop and ClientApps (in-process routing, no Ray):
same result as plain aggregation, dropouts at each stage, below-threshold failure, clip range."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message

from fedcare import protocol
from fedcare.run_config import RunSettings
from server.federation_loop import run_federation
from tests.support.inprocess_grid import RUN_ID, InProcessGrid, node_configs, task_identity  # noqa: F401


class DroppingGrid(InProcessGrid):
    """A node that stops answering from a given message type of a given round on."""

    def __init__(self, node_configs, node: int, message_type: str, from_round: int = 0):
        super().__init__(node_configs)
        self.node, self.message_type, self.from_round = node, message_type, from_round
        self.rounds_seen = 0
        self.gone = False

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == self.node:
                self.rounds_seen += 1
            if (
                msg.metadata.dst_node_id == self.node
                and msg.metadata.message_type == self.message_type
                and self.rounds_seen >= self.from_round
            ):
                self.gone = True
            if self.gone and msg.metadata.dst_node_id == self.node:
                replies.append(Message(Error(code=0, reason="node lost"), reply_to=msg))
                continue
            replies.extend(super().send_and_receive([msg], timeout))
        return replies


def _arrays(result) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in result.arrays.items()}


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_secure_aggregate_equals_plain_weighted_average_within_the_quantisation_bound(tmp_path, strategy):
    plain = RunSettings(num_rounds=2, dp=False, strategy=strategy, secure_aggregation=False)
    secure = plain.replace(secure_aggregation=True)
    a = run_federation(
        InProcessGrid(node_configs(tmp_path / "a", [1.0] * 4), reproducible_noise=0),
        plain,
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    b = run_federation(
        InProcessGrid(node_configs(tmp_path / "b", [1.0] * 4), reproducible_noise=0),
        secure,
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    bound = 2 * secure.secagg_clip_range / (2**32 - 1) * secure.num_rounds + 1e-6  # + float32 rounding
    for name, value in _arrays(a).items():
        assert np.abs(_arrays(b)[name] - value).max() <= bound, name
    assert b.rounds[-1].evaluation["pooled"]["accuracy"] == pytest.approx(
        a.rounds[-1].evaluation["pooled"]["accuracy"], abs=1e-9
    )


def test_with_dp_the_secure_run_reaches_the_same_accuracy(tmp_path):
    plain = RunSettings(num_rounds=3, secure_aggregation=False, seed=2)
    a = run_federation(
        InProcessGrid(node_configs(tmp_path / "a", [1.0] * 4), reproducible_noise=2),
        plain,
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    b = run_federation(
        InProcessGrid(node_configs(tmp_path / "b", [1.0] * 4), reproducible_noise=2),
        plain.replace(secure_aggregation=True),
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    acc_a = a.rounds[-1].evaluation["pooled"]["accuracy"]
    acc_b = b.rounds[-1].evaluation["pooled"]["accuracy"]
    assert abs(acc_a - acc_b) <= 0.01
    assert {h.name: h.epsilon for h in a.hospitals.values()} == {h.name: h.epsilon for h in b.hospitals.values()}


@pytest.mark.parametrize(
    "stage", [protocol.SECAGG_ADVERTISE, protocol.SECAGG_SHARE_KEYS, "train", protocol.SECAGG_UNMASK]
)
def test_one_dropout_at_any_stage_does_not_stop_the_run(tmp_path, stage):
    progress: list[str] = []
    s = RunSettings(num_rounds=2, dp=False)
    grid = DroppingGrid(node_configs(tmp_path, [1.0] * 4), node=101, message_type=stage)
    result = run_federation(grid, s, 4, progress.append, timeout=5, run_id=RUN_ID)
    assert len(result.rounds) == 2 and result.stopped_early is None, progress
    assert all(r.evaluation for r in result.rounds)
    last = result.rounds[-1]
    assert "Hungary" not in last.trained and len(last.trained) == 3
    assert "secure aggregation" not in last.failed, last.failed
    if stage == protocol.SECAGG_UNMASK:
        # its masked input arrived before it vanished: round 1 still counts its update, and names it
        assert "Hungary" in result.rounds[0].trained
        assert result.rounds[0].secagg == {"path": "fast", "dropped": [], "silent": ["Hungary"]}
        assert any("Hungary did not answer the unmask exchange" in line for line in progress), progress
        # round 2: it sent no masked input; the others unmask on the consistency path, Hungary named
        assert last.secagg["path"] == "consistency" and last.secagg["dropped"] == ["Hungary"]
    if stage == "train":
        assert result.rounds[0].secagg["dropped"] == ["Hungary"]


def test_below_the_threshold_the_round_fails_cleanly_and_the_model_stays(tmp_path):
    progress: list[str] = []
    s = RunSettings(num_rounds=2, dp=False, secagg_threshold=4)
    grid = DroppingGrid(node_configs(tmp_path, [1.0] * 4), node=102, message_type="train")
    result = run_federation(grid, s, 4, progress.append, timeout=5, run_id=RUN_ID)
    first = result.rounds[0]
    assert "secure aggregation" in first.failed
    assert "only 3 of 4 nodes sent masked inputs for round 1; the threshold is 4" in first.failed["secure aggregation"]
    assert any("round 1 failed, model unchanged" in line for line in progress)
    assert all(np.all(v == 0) for v in _arrays(result).values())  # the zero-initialised model, untouched
    assert result.stopped_early and "threshold is 4" in result.stopped_early


def test_an_update_outside_the_clip_range_is_clipped_at_the_hospital_and_charged(tmp_path):
    """Nothing from the update reaches the server as a refusal: the hospital clips into the agreed range
    (post-processing of its DP release), the round completes, and the round it trained is paid for."""
    clip = 1e-6
    s = RunSettings(num_rounds=1, secagg_clip_range=clip)
    progress: list[str] = []
    result = run_federation(
        InProcessGrid(node_configs(tmp_path, [1.0] * 4)), s, 4, progress.append, timeout=5, run_id=RUN_ID
    )
    first = result.rounds[0]
    assert first.refused == {} and first.failed == {}
    assert sorted(first.trained) == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    assert not any(ch.isdigit() for line in progress if "clip" in line for ch in line)
    for h in result.hospitals.values():  # the training round was charged on top of the statistics answer
        assert h.epsilon is not None and h.epsilon > 0.5, h
    # the model moved by at most the clip range per value (plus the quantisation step)
    assert all(np.abs(v).max() <= clip * (1 + 1e-6) for v in _arrays(result).values())
