"""The hospital's node config, read once into a typed record (client/node_config.py)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import make_client_app
from client.node_config import NodeConfig
from fedcare import protocol
from fedcare.run_config import RunSettings
from fedcare.wire import Refusal
from server.federation_loop import training_config
from tests.support.inprocess_grid import RUN_ID, task_identity  # noqa: F401  (autouse)


def test_node_config_wins_over_simulation_defaults_and_run_config_only_fills_shared_folders() -> None:
    settings = NodeConfig.read(
        {"partition-id": "2", "dataset-id": "", "require-deidentified": "off", "secagg-roster": "roster.json"},
        {"partition-id": 0, "ledger-dir": "sim-ledgers", "cache-dir": "c"},
        {"data-root": "/shared", "ledger-dir": "run-ledgers"},
    )
    assert settings == NodeConfig(
        ledger_dir="sim-ledgers",
        partition_id=2,
        data_root="/shared",
        cache_dir="c",
        require_deidentified=False,
        secagg_roster="roster.json",
    )
    assert NodeConfig.read({}, {}, {"ledger-dir": "run-ledgers"}).ledger_dir == "run-ledgers"
    assert NodeConfig.read({}, {}, {}) == NodeConfig()


def test_a_partition_id_that_is_not_a_number_is_refused_by_name(tmp_path) -> None:
    """Before: ``int("second")`` raised a ValueError out of the ClientApp (a traceback, no refusal)."""
    config = training_config(RunSettings(secure_aggregation=False, dp=False))
    node = {
        "partition-id": "second",
        "ledger-dir": str(tmp_path),
        "require-dp": False,
        "require-secure-aggregation": False,
    }
    reply = make_client_app()(
        Message(
            RecordDict({protocol.CONFIG: ConfigRecord(config)}), dst_node_id=100, message_type=protocol.FEATURE_STATS
        ),
        Context(RUN_ID, 100, node, RecordDict(), {}),
    )
    refusal = Refusal.from_content(reply.content)
    assert refusal is not None and "node config's partition-id is not a whole number" in refusal.reason
