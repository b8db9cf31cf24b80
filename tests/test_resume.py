"""A coordinator crash after round 2: `resume` continues from the checkpoint and ends exactly where an
uninterrupted run ends — same model (FedAdam moments included), same epsilon, nothing counted twice."""

from __future__ import annotations

import numpy as np
import pytest

from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings
from server.checkpoint import load_checkpoint
from server.federation_loop import run_federation
from tests.support.inprocess_grid import RUN_ID, InProcessGrid, node_configs, task_identity  # noqa: F401


class CrashingGrid(InProcessGrid):
    """The coordinator dies when it tries to send the train messages of round ``crash_round``."""

    def __init__(self, node_configs, crash_round: int, reproducible_noise: int | None = None):
        super().__init__(node_configs, reproducible_noise=reproducible_noise)
        self.crash_round, self.trains = crash_round, 0

    def send_and_receive(self, messages, timeout=None):
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
            if self.trains == self.crash_round:
                raise RuntimeError("coordinator host lost power")
        return super().send_and_receive(messages, timeout)


@pytest.mark.parametrize("strategy,dp", [("fedadam", False), ("fedavg", True)])
def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, strategy, dp):
    s = RunSettings(num_rounds=4, strategy=strategy, dp=dp, output_dir=str(tmp_path / "whole"))
    # the same noise in both runs (reproducible noise: a test's seed), so their models can be compared
    whole = run_federation(
        InProcessGrid(node_configs(tmp_path / "a", [1.0] * 4), reproducible_noise=0),
        s,
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )

    crashed = s.replace(output_dir=str(tmp_path / "crashed"))
    nodes = node_configs(tmp_path / "b", [1.0] * 4)
    with pytest.raises(RuntimeError, match="lost power"):
        run_federation(
            CrashingGrid(nodes, crash_round=3, reproducible_noise=0),
            crashed,
            4,
            lambda _: None,
            timeout=5,
            run_id=RUN_ID,
        )
    assert load_checkpoint(crashed.output_dir).completed_round == 2

    progress: list[str] = []
    relaunch = InProcessGrid(nodes, run_id=RUN_ID + 1, reproducible_noise=0)  # a relaunch is a new Flower run
    resumed = run_federation(relaunch, crashed.replace(resume=True), 4, progress.append, timeout=5, run_id=RUN_ID + 1)
    assert resumed.stopped_early is None, progress
    assert any("resuming run 4242 after round 2 of 4" in line for line in progress)
    assert [r.round for r in resumed.rounds] == [1, 2, 3, 4]
    for name, value in whole.arrays.items():
        np.testing.assert_allclose(resumed.arrays[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)
    eps_whole = {h.name: h.epsilon for h in whole.hospitals.values()}
    eps_resumed = {h.name: h.epsilon for h in resumed.hospitals.values()}
    if dp:
        assert eps_resumed == pytest.approx(eps_whole, rel=1e-9)
        assert all(e <= 1.0 + 1e-9 for e in eps_resumed.values())


def test_resume_refuses_changed_settings_and_a_missing_checkpoint(tmp_path):
    s = RunSettings(num_rounds=1, dp=False, output_dir=str(tmp_path / "run"))
    with pytest.raises(FedcareError, match="no checkpoint to resume"):
        run_federation(
            InProcessGrid(node_configs(tmp_path, [1.0] * 4)),
            s.replace(resume=True),
            4,
            lambda _: None,
            timeout=5,
            run_id=RUN_ID,
        )
    run_federation(InProcessGrid(node_configs(tmp_path, [1.0] * 4)), s, 4, lambda _: None, timeout=5, run_id=RUN_ID)
    with pytest.raises(FedcareError, match="settings differ from the checkpointed run: learning-rate"):
        run_federation(
            InProcessGrid(node_configs(tmp_path, [1.0] * 4)),
            s.replace(resume=True, learning_rate=0.9),
            4,
            lambda _: None,
            timeout=5,
            run_id=RUN_ID,
        )


class CrashAfterTrainingGrid(InProcessGrid):
    """The coordinator dies right after the hospitals trained round ``crash_round`` (each charged it in its
    ledger), before it aggregated or checkpointed that round: the double-charge case."""

    def __init__(self, node_configs, crash_round: int):
        super().__init__(node_configs)
        self.crash_round, self.trains = crash_round, 0

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
            if self.trains == self.crash_round:
                raise RuntimeError("coordinator host lost power")
        return replies


def test_a_round_charged_before_a_crash_is_replanned_and_the_resumed_run_finishes_within_budget(tmp_path):
    from audit.verify import verify
    from server.run_report import write_report

    # budget = target: the planned rounds spend the whole budget, so a round paid twice cannot fit
    s = RunSettings(num_rounds=3, target_epsilon=1.0, output_dir=str(tmp_path / "out"))
    nodes = node_configs(tmp_path, [1.0] * 4)
    with pytest.raises(RuntimeError, match="lost power"):
        run_federation(CrashAfterTrainingGrid(nodes, crash_round=2), s, 4, lambda _: None, timeout=5, run_id=RUN_ID)
    assert load_checkpoint(s.output_dir).completed_round == 1

    progress: list[str] = []
    resumed = run_federation(
        InProcessGrid(nodes, run_id=RUN_ID + 1),
        s.replace(resume=True),
        4,
        progress.append,
        timeout=5,
        run_id=RUN_ID + 1,
    )
    assert resumed.stopped_early is None and resumed.status == "completed", progress
    assert [sorted(r.trained) for r in resumed.rounds[1:]] == [sorted(h.name for h in resumed.hospitals.values())] * 2
    for h in resumed.hospitals.values():
        assert 0.99 < h.epsilon <= 1.0 + 1e-9, (h.name, h.epsilon)  # the whole plan, round 2 paid twice, no more
    line = next(x for x in progress if "was charged at 4 hospitals" in x)
    assert line.startswith(
        "round 2 was charged at 4 hospitals (Cleveland, Hungary, Switzerland, VA Long Beach) "
        "but its update was lost in the crash"
    )
    assert "the remaining rounds use noise multiplier" in line and "instead of" in line
    cost = resumed.crash_cost
    assert cost["lost_rounds"] == {"2": sorted(h.name for h in resumed.hospitals.values())}
    for noise in cost["noise"].values():
        assert noise["now"] > noise["planned"] and noise["from_round"] == 2
    results = write_report(s.output_dir, s, resumed, str(RUN_ID + 1))
    assert results["status"] == "completed" and results["crash_cost"]["lost_rounds"] == cost["lost_rounds"]

    # ... and the audit trail of the crashed and the resumed run verifies clean
    ledgers = tmp_path / "ledgers"
    report = verify(
        [*sorted((ledgers / "audit").glob("*.jsonl")), tmp_path / "out" / "audit" / "server.jsonl"], ledgers
    )
    assert report.ok, "\n".join(map(str, report.findings))
    assert sum("charged, not aggregated (server crash)" in f.reason for f in report.notes) == 4


def test_a_run_whose_last_round_nobody_trained_is_reported_incomplete(tmp_path):
    class BudgetLoweredGrid(InProcessGrid):
        """Every hospital lowers its budget to nothing before the last round (lowering needs no signature)."""

        trains = 0

        def send_and_receive(self, messages, timeout=None):
            if messages and messages[0].metadata.message_type == "train":
                self.trains += 1
            if self.trains == 2:
                for context in self.contexts.values():
                    context.node_config["epsilon-budget"] = 0.01
            return super().send_and_receive(messages, timeout)

    import json

    from flwr.app import Context, RecordDict

    from server.server_app import make_server_app

    s = RunSettings(num_rounds=2, output_dir=str(tmp_path / "out"))
    progress: list[str] = []
    app = make_server_app(s, 4, progress.append, timeout=5)  # as deployed: no simulation collecting the result
    with pytest.raises(
        FedcareError, match="the run is incomplete: 1 of 2 planned rounds done; round 2 trained by 0 of 4 hospital"
    ):
        app._main(BudgetLoweredGrid(node_configs(tmp_path, [1.0] * 4)), Context(RUN_ID, 0, {}, RecordDict(), {}))
    results = json.loads((tmp_path / "out" / "results.json").read_text())  # written before the run fails
    assert results["status"] == "incomplete" and results["rounds_done"] == 1
    assert results["rounds"][-1]["trained"] == [] and len(results["rounds"][-1]["refused"]) == 4
    assert "the final model is round 1's" in results["stopped_early"]
    assert any(line.startswith("run failed: the run is incomplete") for line in progress)
