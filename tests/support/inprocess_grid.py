"""The coordinator's loop against real ClientApps, routed in-process (no Ray, no SuperLink).

``InProcessGrid`` stands in for Flower's Grid; tests using it import the autouse fixture
``task_identity`` into their module (``# noqa: F401``).
"""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import REPRODUCIBLE_NOISE, SIMULATED_CONSORTIUM, make_client_app

RUN_ID = 4242


class InProcessGrid:
    """Routes each message to the ClientApp of its node, like a SuperLink would."""

    def __init__(
        self,
        node_configs: dict[int, dict],
        run_config: dict | None = None,
        run_id: int = RUN_ID,
        reproducible_noise: int | None = None,
    ):
        # reproducible_noise: every hospital's noise and batches keyed from this seed (comparisons of two runs)
        defaults = {SIMULATED_CONSORTIUM: str(next(iter(node_configs.values()))["ledger-dir"]) + "/consortium"}
        if reproducible_noise is not None:
            defaults[REPRODUCIBLE_NOISE] = reproducible_noise
        self.app = make_client_app(defaults)
        self.contexts = {
            n: Context(run_id, n, cfg, RecordDict(), dict(run_config or {})) for n, cfg in node_configs.items()
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            replies.append(self.app(msg, self.contexts[node]))
        return replies


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower's task identity as a SuperNode sets it (import this autouse fixture into the test module)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


# Hospitals that accept whatever these loop tests run (DP or not, masked or not, any size):
# policy refusals have tests of their own (tests/test_node_policy.py).
PERMISSIVE = {"require-dp": False, "require-secure-aggregation": False, "min-hospitals": 2}


def node_configs(tmp_path, budgets, **policy) -> dict[int, dict]:
    """Node configs of len(budgets) Fed-Heart-Disease hospitals sharing one ledger folder, PERMISSIVE unless ``policy``."""
    return {
        100 + i: {
            "partition-id": i,
            "ledger-dir": str(tmp_path / "ledgers"),
            "epsilon-budget": b,
            **PERMISSIVE,
            **policy,
        }
        for i, b in enumerate(budgets)
    }
