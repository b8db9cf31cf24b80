"""A hospital node that dies mid-round: Flower's SuperLink answers for it with an error reply *from the
SuperLink* (node 1), not from the node. The coordinator must count that as the node's dropout, not crash.

Seen in tests/test_deployment_recovery.py with real processes: before the fix the ServerApp failed with
``KeyError: 1`` looking up the hospital of the SuperLink's reply, and the run ended ``finished:failed``.
"""

from __future__ import annotations

from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedcare.run_config import RunSettings
from server.federation_loop import run_federation
from tests.support.inprocess_grid import RUN_ID, InProcessGrid, node_configs, task_identity  # noqa: F401


class DyingNodeGrid(InProcessGrid):
    """Gives every message its id as Flower's Grid does on push; node ``dead`` stops after ``after`` trains."""

    def __init__(self, node_configs, dead: int, after: int):
        super().__init__(node_configs)
        self.dead, self.after, self.trains = dead, after, 0

    def send_and_receive(self, messages, timeout=None):
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
        replies = []
        for msg in messages:
            if msg.metadata.dst_node_id == self.dead and self.trains > self.after:
                # what the SuperLink returns once the node missed its heartbeats
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
            else:
                replies.extend(super().send_and_receive([msg], timeout))
        return replies


def test_a_node_unavailable_reply_from_the_superlink_is_that_hospitals_dropout(tmp_path):
    nodes = node_configs(tmp_path, [1.0] * 3)  # Cleveland, Hungary, Switzerland (node 102)
    progress: list[str] = []
    s = RunSettings(num_rounds=2, hospitals=3, min_hospitals=2, output_dir=str(tmp_path / "out"))
    result = run_federation(DyingNodeGrid(nodes, dead=102, after=1), s, 3, progress.append, timeout=5, run_id=RUN_ID)
    assert result.stopped_early is None
    first, second = result.rounds
    assert sorted(first.trained) == ["Cleveland", "Hungary", "Switzerland"] and not first.failed
    assert sorted(second.trained) == ["Cleveland", "Hungary"]
    assert list(second.failed) == ["Switzerland"] and "Node Unavailable" in second.failed["Switzerland"]
    assert "node 1" not in str(result.hospitals) and 1 not in result.hospitals
    assert sorted(second.evaluation) == ["Cleveland", "Hungary", "pooled"]
    assert any(line.startswith("round  2/2") and "failed: Switzerland" in line for line in progress), progress
