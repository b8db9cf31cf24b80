"""A hospital's budget cannot be reset by accident or by hand: the ledger must agree with the signed chain.

Attacks from the review: deleting a ledger (a fresh budget), restoring an older copy (less
history), editing its budget, and adding one patient to the table (a new content digest used to
start a new ledger). Each is tried on the node's own files; the node refuses to release until the
files agree again, and says why and what to do.
"""

from __future__ import annotations

import json
import shutil

import pytest

from client import audit_trail
from client.ledger_guard import LedgerTampered, open_checked_ledger, raise_budget
from tests.support.hospital_state import spend

DATASET = "cardiology-2026"


def _spent(tmp_path, budget=2.0):
    return spend(tmp_path, "Hungary", DATASET, [(1.1, 0.1, 100)], budget=budget)


def _open(tmp_path, budget=2.0):
    return open_checked_ledger(
        audit_trail.open_log(tmp_path, "Hungary"), str(tmp_path), "Hungary", DATASET, budget=budget, delta=1e-4
    )


def test_a_deleted_ledger_beside_its_chain_is_refused(tmp_path):
    ledger = _spent(tmp_path)
    ledger.path.unlink()
    with pytest.raises(LedgerTampered, match=r"is missing, but the signed audit log .* records 1 release"):
        _open(tmp_path)


def test_a_rolled_back_ledger_is_refused(tmp_path):
    ledger = _spent(tmp_path)
    backup = tmp_path / "backup.json"
    shutil.copy(ledger.path, backup)
    spend(tmp_path, "Hungary", DATASET, [(1.1, 0.1, 100)], budget=2.0, round_=13)
    shutil.copy(backup, ledger.path)
    with pytest.raises(LedgerTampered, match=r"holds 1 charged release.*less than the 2 release.*rolled back"):
        _open(tmp_path)


def test_a_budget_raised_by_hand_in_the_ledger_is_refused(tmp_path):
    ledger = _spent(tmp_path)
    data = json.loads(ledger.path.read_text())
    data["budget"] = 50.0
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(LedgerTampered, match=r"sets budget 50, above the 2 last signed .*edited by hand"):
        _open(tmp_path)


def test_a_configured_budget_above_the_signed_one_needs_the_explicit_command(tmp_path):
    _spent(tmp_path)
    with pytest.raises(
        LedgerTampered,
        match=r"configured epsilon-budget 3 .* above the 2 last signed.*"
        r"fedcare node budget --config hospital.toml --to 3",
    ):
        _open(tmp_path, budget=3.0)
    assert _open(tmp_path, budget=1.5).budget == 1.5  # lowering needs nothing
    log = audit_trail.open_log(tmp_path, "Hungary")
    assert raise_budget(log, str(tmp_path), "Hungary", DATASET, 3.0, "ethics board approval 2026-12") == 2.0
    assert _open(tmp_path, budget=3.0).budget == 3.0
    last = log.read_verified()[-1]
    assert last["kind"] == "budget" and last["body"]["budget"] == 3.0 and last["body"]["previous"] == 2.0


def test_a_ledger_copied_in_without_its_chain_and_a_removed_log_are_refused(tmp_path):
    ledger = _spent(tmp_path)
    log_path = tmp_path / "audit" / "Hungary.jsonl"
    log_path.unlink()
    with pytest.raises(LedgerTampered, match=r"audit log .* is missing but its signing key exists"):
        _open(tmp_path)
    (tmp_path / "audit" / "Hungary-signing-key.pem").unlink()
    with pytest.raises(LedgerTampered, match=r"exists, but the signed audit log .* has no record of it"):
        _open(tmp_path)
    # Only with the ledger, the log and the key all gone does the node start over; the coordinator's
    # signed round records still show this hospital's releases to an auditor (`fedcare audit verify`).
    ledger.path.unlink()
    (tmp_path / "audit" / "Hungary-signing-key.pem").unlink()
    assert _open(tmp_path).epsilon() == 0.0


def test_a_node_stopped_before_its_first_signed_budget_record_still_starts(tmp_path):
    """Creating the ledger and signing its first budget are two writes; a stop between them spent
    nothing, so the next start proceeds instead of refusing forever."""
    from client.privacy_ledger import PrivacyLedger

    PrivacyLedger.open(tmp_path, "Hungary", DATASET, budget=2.0, delta=1e-4)  # the ledger, no chain yet
    assert _open(tmp_path).epsilon() == 0.0
    assert audit_trail.open_log(tmp_path, "Hungary").read_verified()[-1]["kind"] == "budget"


def test_an_edited_audit_chain_is_refused(tmp_path):
    _spent(tmp_path)
    spend(tmp_path, "Hungary", DATASET, [(1.1, 0.1, 100)], budget=2.0, round_=13)
    log_path = tmp_path / "audit" / "Hungary.jsonl"
    lines = log_path.read_text().splitlines()
    log_path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # drop the first release record
    with pytest.raises(LedgerTampered, match="does not chain to the line before"):
        _open(tmp_path)


def test_adding_a_patient_keeps_the_epsilon_already_spent(tmp_path):
    """The ledger follows the declared dataset identity, not the content: a new row does not reset the budget."""
    import pandas as pd
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import make_client_app
    from fedcare import protocol
    from fedcare.run_config import RunSettings
    from server.federation_loop import training_config
    from simulation.synthetic_table import write_table_hospitals

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    write_table_hospitals(tmp_path / "data", 1, rows_per_hospital=120)
    folder = tmp_path / "data" / "hospital-0"
    node = {
        "data-path": str(folder / "table.csv"),
        "schema": str(folder / "schema.toml"),
        "dataset-id": DATASET,
        "ledger-dir": str(tmp_path / "ledgers"),
        "epsilon-budget": 3.0,
        "min-hospitals": 2,
    }
    config = training_config(RunSettings(dataset="ehr-table", target_epsilon=1.0, num_rounds=2, hospitals=4))

    def ask(run: int) -> float:
        from client.client_app import _hospital

        _hospital.cache_clear()
        reply = make_client_app()(
            Message(
                RecordDict({protocol.CONFIG: ConfigRecord(config)}), dst_node_id=5, message_type=protocol.FEATURE_STATS
            ),
            Context(run, 5, node, RecordDict(), {}),
        )
        return float(reply.content.metric_records[protocol.METRICS]["epsilon"])

    first = ask(1)
    table = pd.read_csv(folder / "table.csv")
    newcomer = table.iloc[[0]].copy()
    newcomer["patient_id"] = "P-NEW-0001"
    pd.concat([table, newcomer]).to_csv(folder / "table.csv", index=False)  # one more patient
    second = ask(2)
    assert first > 0 and second > first  # the new release is charged on top of the old one
    assert len(list((tmp_path / "ledgers").glob("privacy-ledger-*.json"))) == 1
    ledger = json.loads(next((tmp_path / "ledgers").glob("privacy-ledger-*.json")).read_text())
    fingerprints = {r["data_fingerprint"] for r in ledger["releases"]}
    assert len(fingerprints) == 2  # each release says which version of the data it came from


def test_the_node_budget_command_writes_the_signed_raise(tmp_path):
    from typer.testing import CliRunner

    from fedcare.deploy_commands import node_app
    from fedcare.deploy_pki import init_deployment

    files = init_deployment(tmp_path / "deploy", ["Cleveland"])
    settings = files.hospitals[0].settings
    ledgers = files.hospitals[0].folder / "ledgers"
    spend(ledgers, "Cleveland", "Cleveland-heart-disease", [(1.1, 0.1, 100)], budget=1.0)
    runner = CliRunner()
    done = runner.invoke(node_app, ["budget", "--config", str(settings), "--to", "2.5", "--reason", "board 2026-12"])
    assert done.exit_code == 0, done.output
    assert "the budget of Cleveland-heart-disease is now 2.5 (was 1)" in done.output
    assert "set epsilon-budget = 2.5" in done.output
    settings.write_text(settings.read_text().replace("epsilon-budget = 1.0", "epsilon-budget = 2.5"))
    assert _open_at(ledgers, "Cleveland", "Cleveland-heart-disease", 2.5).budget == 2.5
    again = runner.invoke(node_app, ["budget", "--config", str(settings), "--to", "2.0", "--reason", "x"])
    assert again.exit_code == 1 and "is not above the signed budget 2.5" in again.output


def _open_at(ledgers, hospital, dataset_id, budget):
    return open_checked_ledger(
        audit_trail.open_log(ledgers, hospital), str(ledgers), hospital, dataset_id, budget=budget, delta=1e-4
    )
