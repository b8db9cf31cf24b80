"""An update outside the secure-aggregation range: the hospital clips it and keeps taking part.

The hospital clips into the agreed [-clip, clip] before masking and logs how many values it
clipped on its own node only. The server sees a normal masked reply: the hospital (the largest
one included) trains in every later round, and no reply carries anything about the clipping.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, MetricRecord

from fedcare.run_config import RunSettings
from server.federation_loop import run_federation
from tests.support.inprocess_grid import RUN_ID, InProcessGrid, node_configs, task_identity  # noqa: F401

HOSPITALS = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]  # Cleveland holds the most patients
CLIPPED = "update values were outside the secure-aggregation range and were clipped"


class RecordingGrid(InProcessGrid):
    """Keeps every reply the server receives, to check what the hospitals sent."""

    def __init__(self, node_configs):
        super().__init__(node_configs)
        self.replies = []

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        self.replies.extend(replies)
        return replies


class NodeLog(logging.Handler):
    """What the hospitals log on their own nodes (Flower's logger does not propagate)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _run(tmp_path, clip: float):
    grid = RecordingGrid(node_configs(tmp_path, [1.0] * 4))
    progress: list[str] = []
    log, flwr_logger = NodeLog(), logging.getLogger("flwr")
    flwr_logger.addHandler(log)
    try:
        result = run_federation(
            grid,
            RunSettings(num_rounds=3, dp=False, secagg_clip_range=clip),
            4,
            progress.append,
            timeout=5,
            run_id=RUN_ID,
        )
    finally:
        flwr_logger.removeHandler(log)
    return result, grid, progress, log.lines


def _reply_fields(grid: RecordingGrid) -> set[tuple[str, str, str]]:
    """(message type, record, key) of every reply: the shape of what the server learned."""
    fields = set()
    for reply in grid.replies:
        if reply.has_error():
            continue
        for name, record in reply.content.items():
            if isinstance(record, (ConfigRecord, MetricRecord)):
                fields |= {(reply.metadata.message_type, name, key) for key in record}
    return fields


def test_a_hospital_whose_update_leaves_the_range_takes_part_in_every_later_round(tmp_path):
    result, grid, progress, node_log = _run(tmp_path / "clipped", clip=1e-6)
    assert result.stopped_early is None and len(result.rounds) == 3
    for rnd in result.rounds:
        assert sorted(rnd.trained) == HOSPITALS, (rnd.number, rnd.trained, rnd.failed, rnd.refused)
        assert rnd.refused == {} and rnd.failed == {} and rnd.secagg["dropped"] == []
    assert all(h.active for h in result.hospitals.values())
    # every hospital clipped in every round, and said so only on its own node
    assert sum(CLIPPED in line for line in node_log) == 3 * len(HOSPITALS), node_log
    assert not any("clip" in line for line in progress), progress
    # nothing about it reached the server: the replies have the fields of a run that clipped nothing
    _, unclipped_grid, _, unclipped_log = _run(tmp_path / "in-range", clip=10.0)
    assert not any(CLIPPED in line for line in unclipped_log)
    assert _reply_fields(grid) == _reply_fields(unclipped_grid)
    assert not any("clip" in key for _, _, key in _reply_fields(grid))
