"""Personalisation: each hospital fine-tunes the final model on its own data inside its privacy plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audit.verify import verify
from fedcare.run_config import RunSettings
from server.federation_loop import run_federation
from server.run_report import write_report
from tests.support.inprocess_grid import RUN_ID, InProcessGrid, node_configs, task_identity  # noqa: F401

HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")


def _ledger(tmp_path, hospital: str) -> dict:
    slug = hospital.replace(" ", "-")
    return json.loads(next((tmp_path / "ledgers").glob(f"privacy-ledger-*{slug}-*.json")).read_text())


def test_personalised_models_are_charged_in_the_plan_audited_and_stay_at_the_hospital(tmp_path):
    s = RunSettings(num_rounds=2, personalise_rounds=2, target_epsilon=1.0, output_dir=str(tmp_path / "out"))
    result = run_federation(
        InProcessGrid(node_configs(tmp_path, [3.0] * 4)), s, 4, lambda _: None, timeout=5, run_id=RUN_ID
    )
    assert sorted(result.personalised) == sorted(HOSPITALS)
    for h in result.hospitals.values():
        # the run's target covers training and personalisation together: never more
        assert h.epsilon == pytest.approx(1.0, abs=1e-3) and h.epsilon <= 1.0 + 1e-9
        ledger = _ledger(tmp_path, h.name)
        kinds = [(r["kind"], r["round"]) for r in ledger["releases"]]
        assert kinds[-2:] == [("personalise", 3), ("personalise", 4)]
        assert ledger["releases"][-1]["epsilon_after"] == pytest.approx(h.epsilon)
    kept = sorted(p.name for p in (tmp_path / "ledgers" / "personalised").iterdir())
    assert len(kept) == 4 and all(name.endswith(f"-run-{RUN_ID}.npz") for name in kept)
    report = verify(
        sorted((tmp_path / "out").rglob("*.jsonl")) + sorted((tmp_path / "ledgers").rglob("*.jsonl")),
        tmp_path / "ledgers",
    )
    assert report.errors == []
    results = write_report(tmp_path / "out", s, result, str(RUN_ID))
    assert set(results["personalised"]) == {*HOSPITALS, "pooled"}
    assert results["personalised"]["pooled"]["n"] == results["final"]["pooled"]["n"]


def test_personalising_from_the_final_model_differs_from_it_and_is_off_with_zero_rounds(tmp_path):
    s = RunSettings(
        num_rounds=1, personalise_rounds=1, dp=False, secure_aggregation=False, output_dir=str(tmp_path / "out")
    )
    result = run_federation(
        InProcessGrid(node_configs(tmp_path / "a", [1.0] * 4)), s, 4, lambda _: None, timeout=5, run_id=RUN_ID
    )
    fed = {name: sm.metrics()["loss"] for name, sm in result.final_summaries.items()}
    own = {name: sm.metrics()["loss"] for name, sm in result.personalised.items()}
    assert set(own) == set(fed) and any(not np.isclose(own[n], fed[n]) for n in own)
    off = run_federation(
        InProcessGrid(node_configs(tmp_path / "b", [1.0] * 4)),
        s.replace(personalise_rounds=0),
        4,
        lambda _: None,
        timeout=5,
        run_id=RUN_ID,
    )
    assert off.personalised == {}


def test_a_coordinator_cannot_shrink_the_privacy_plan_with_negative_personalisation(tmp_path):
    """A coordinator running its own code asks for -14 personalisation rounds, so the hospital would plan
    its noise for 1 round of a 15-round run. The hospital refuses before releasing anything."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.client_app import make_client_app
    from fedcare import protocol
    from server.federation_loop import training_config

    config = training_config(RunSettings(num_rounds=15)) | {"personalise-rounds": -14}
    node = node_configs(tmp_path, [1.0] * 4)[101]
    reply = make_client_app()(
        Message(
            RecordDict({protocol.CONFIG: ConfigRecord(config)}), dst_node_id=101, message_type=protocol.FEATURE_STATS
        ),
        Context(RUN_ID, 101, node, RecordDict(), {}),
    )
    refusal = reply.content.config_records[protocol.REFUSAL]
    assert refusal["kind"] == "policy" and "personalise-rounds=-14 is negative" in refusal["reason"]
    assert protocol.METRICS not in reply.content.metric_records
