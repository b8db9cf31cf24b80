"""A coordinator crash after round 2: `resume` continues from the checkpoint and ends exactly where an
uninterrupted run ends — same model (FedAdam moments included), same epsilon, nothing counted twice."""

from __future__ import annotations

import numpy as np
import pytest

from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings
from server.checkpoint import load_checkpoint
from server.federation_loop import run_federation
from tests.test_federation_loop import RUN_ID, InProcessGrid, _nodes, _task_identity  # noqa: F401


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
    whole = run_federation(InProcessGrid(_nodes(tmp_path / "a", [1.0] * 4), reproducible_noise=0), s, 4,
                           lambda _: None, timeout=5, run_id=RUN_ID)

    crashed = s.replace(output_dir=str(tmp_path / "crashed"))
    nodes = _nodes(tmp_path / "b", [1.0] * 4)
    with pytest.raises(RuntimeError, match="lost power"):
        run_federation(CrashingGrid(nodes, crash_round=3, reproducible_noise=0), crashed, 4, lambda _: None,
                       timeout=5, run_id=RUN_ID)
    assert load_checkpoint(crashed.output_dir).completed_round == 2

    progress: list[str] = []
    relaunch = InProcessGrid(nodes, run_id=RUN_ID + 1, reproducible_noise=0)  # a relaunch is a new Flower run
    resumed = run_federation(relaunch, crashed.replace(resume=True), 4, progress.append, timeout=5,
                             run_id=RUN_ID + 1)
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
        run_federation(InProcessGrid(_nodes(tmp_path, [1.0] * 4)), s.replace(resume=True), 4, lambda _: None,
                       timeout=5, run_id=RUN_ID)
    run_federation(InProcessGrid(_nodes(tmp_path, [1.0] * 4)), s, 4, lambda _: None, timeout=5, run_id=RUN_ID)
    with pytest.raises(FedcareError, match="settings differ from the checkpointed run: learning-rate"):
        run_federation(InProcessGrid(_nodes(tmp_path, [1.0] * 4)), s.replace(resume=True, learning_rate=0.9), 4,
                       lambda _: None, timeout=5, run_id=RUN_ID)
