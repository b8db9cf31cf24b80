"""`audit.verify`: a clean multi-hospital federation verifies; every kind of tampering is found.

The federation is built with the real pieces: ``AuditLog`` per node and for the server, the
hospitals' real ``PrivacyLedger`` (so ``epsilon_after`` is what the ledger computed), realistic
Fed-Heart-Disease sizes, noise calibrated by the ledger's run plan, secure aggregation roles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from audit.audit_log import AuditLog, BudgetRecord, canonical_json, line_hash
from audit.signing import load_or_create_key
from audit.verify import verify
from client.privacy_ledger import PrivacyLedger
from tests.support.audit_federation import (
    DELTA,
    HOSPITALS,
    ROUNDS,
    RUN,
    STATS_SIGMA,
    TRAIN_SIGMA,
    Federation,
    build_federation,
)


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return build_federation(tmp_path_factory.mktemp("federation"))


@pytest.fixture()
def fed(_template: Federation, tmp_path: Path) -> Federation:
    """A private copy of the clean federation (built once per module: tests tamper with files)."""
    root = tmp_path / "fed"
    shutil.copytree(_template.root, root)
    return Federation(
        root,
        {h: root / p.name for h, p in _template.node_logs.items()},
        root / "server.jsonl",
        root / "ledgers",
        dict(_template.final_epsilon),
        dict(_template.stats_sent),
    )


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _has(report, file: Path, line: int, reason: str) -> bool:
    return any(
        f.file == str(file) and f.line == line and reason in f.reason and f.level == "error" for f in report.findings
    )


def _explain(report) -> str:
    return "\n".join(map(str, report.findings))


# ---- clean -------------------------------------------------------------------------------------------
def test_clean_federation_verifies_with_ledgers(fed: Federation) -> None:
    report = verify(fed.logs, fed.ledger_dir)
    assert report.ok, _explain(report)
    assert report.errors == [] and report.notes == []
    for h, eps in fed.final_epsilon.items():
        view = report.hospitals[h]
        assert view.epsilon[hashlib.sha256(h.encode()).hexdigest()] == pytest.approx(eps, rel=1e-9)
        assert len(view.releases) == (3 if h == "Switzerland" else 4)
    assert len(report.hospitals["Switzerland"].refusals) == 1
    assert len(report.rounds) == ROUNDS and len(report.runs) == 1
    assert 0.5 < fed.final_epsilon["Cleveland"] < 5  # a realistic clinical range


def test_epsilon_accumulates_across_runs(fed: Federation, tmp_path: Path) -> None:
    build_federation(fed.root, run_id="4343", reuse=fed)  # same keys, same files: the logs go on
    report = verify(fed.logs, fed.ledger_dir)
    assert report.ok, _explain(report)
    eps = report.hospitals["Hungary"].epsilon[hashlib.sha256(b"Hungary").hexdigest()]
    assert eps == pytest.approx(fed.final_epsilon["Hungary"], rel=1e-9)
    first_run = [r.epsilon_replayed for r in report.hospitals["Hungary"].releases if r.run_id == RUN][-1]
    assert eps > first_run


def test_trusted_keys(fed: Federation) -> None:
    assert verify(fed.logs, trusted_keys={}).ok
    forged = verify(fed.logs, trusted_keys={"Hungary": "00" * 32})
    assert _has(forged, fed.node_logs["Hungary"], 1, "not its registered key")


# ---- tampering, one kind at a time -------------------------------------------------------------------------
def test_flipped_byte_in_body(fed: Federation) -> None:
    path = fed.node_logs["Cleveland"]
    lines = _lines(path)
    at = lines[1].index(b'"epsilon_after":') + len(b'"epsilon_after":') + 3
    lines[1] = lines[1][:at] + bytes([lines[1][at] ^ 0x01]) + lines[1][at + 1 :]  # a digit of epsilon
    _write(path, lines)
    report = verify(fed.logs)
    assert _has(report, path, 2, "signature does not verify"), _explain(report)
    assert not report.ok


def test_flipped_bits_anywhere_never_raise(fed: Federation) -> None:
    path = fed.node_logs["Hungary"]
    original = path.read_bytes()
    rng = np.random.default_rng(3)
    for position in rng.choice(len(original), size=40, replace=False):
        data = bytearray(original)
        data[position] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        report = verify(fed.logs, fed.ledger_dir)
        line = original[:position].count(b"\n") + 1
        assert not report.ok
        found = any(f.file == str(path) and f.line in (line, line + 1) for f in report.errors)
        assert found, (position, _explain(report))


def test_flipped_byte_in_signature(fed: Federation) -> None:
    path = fed.server_log
    lines = _lines(path)
    at = lines[1].index(b'"sig":"') + 10
    lines[1] = lines[1][:at] + (b"0" if lines[1][at : at + 1] != b"0" else b"1") + lines[1][at + 1 :]
    _write(path, lines)
    report = verify(fed.logs)
    assert _has(report, path, 2, "signature does not verify"), _explain(report)


def test_deleted_line(fed: Federation) -> None:
    path = fed.node_logs["Hungary"]
    lines = _lines(path)
    del lines[1]  # the round-1 release (line 1: feature statistics, line 3: round-1 unmask)
    _write(path, lines)
    report = verify(fed.logs, fed.ledger_dir)
    assert _has(report, path, 2, "seq 2 where 1 was expected"), _explain(report)
    assert _has(report, path, 2, "prev hash does not match line 1")
    # ... and the cross-checks see it too: the server says Hungary responded in round 1
    assert _has(report, fed.server_log, 2, "Hungary's log has no release")
    assert any(
        "Hungary: ledger release run 4242 round 1 (train) has no audit-log record" in f.reason for f in report.errors
    )


def test_deleted_first_line(fed: Federation) -> None:
    path = fed.node_logs["Hungary"]
    _write(path, _lines(path)[1:])
    report = verify(fed.logs)
    assert _has(report, path, 1, "does not chain to the start of the log"), _explain(report)


def test_reordered_lines(fed: Federation) -> None:
    path = fed.node_logs["Cleveland"]
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    _write(path, lines)
    report = verify(fed.logs)
    assert _has(report, path, 3, "seq 3 where 2 was expected"), _explain(report)
    assert _has(report, path, 3, "prev hash does not match line 2")
    assert _has(report, path, 4, "out of order")
    assert _has(report, path, 4, "prev hash does not match line 3")


def test_inserted_line_signed_by_another_key(fed: Federation, tmp_path: Path) -> None:
    path = fed.node_logs["Switzerland"]
    lines = _lines(path)
    # A forger who copies the chain fields correctly but has only their own key.
    forger = load_or_create_key(tmp_path / "forger.pem")
    from audit.signing import public_key_bytes, sign

    prev = json.loads(lines[1])
    forged = {
        "seq": prev["seq"] + 1,
        "time": prev["time"],
        "actor": "Switzerland",
        "kind": "refusal",
        "prev": line_hash(lines[1]),
        "body": {"run_id": RUN, "round": 2, "reason": "x", "kind": "data"},
        "pubkey": public_key_bytes(forger).hex(),
    }
    forged["sig"] = sign(forger, canonical_json(forged)).hex()
    lines.insert(2, canonical_json(forged))
    _write(path, lines)
    report = verify(fed.logs)
    assert _has(report, path, 3, "not this log's key"), _explain(report)
    assert _has(report, path, 4, "prev hash does not match line 3")
    assert _has(report, path, 4, "out of order or duplicated")


def test_torn_last_line_is_reported(fed: Federation) -> None:
    path = fed.server_log
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    report = verify(fed.logs)
    n = data.count(b"\n")
    assert _has(report, path, n, "incomplete"), _explain(report)


def test_wrong_epsilon_claim(tmp_path: Path) -> None:
    fed = build_federation(tmp_path, claim=lambda h, r, e: e * 0.9 if (h, r) == ("Hungary", 2) else e)
    report = verify(fed.logs, fed.ledger_dir)
    path = fed.node_logs["Hungary"]
    # Hungary's log: 0 feature-stats, 1 release r1, 2 unmask r1, 3 release r2
    assert _has(report, path, 4, "RDP accountant gives"), _explain(report)
    assert _has(report, path, 4, "differs from the privacy ledger")
    assert len([f for f in report.errors if "RDP accountant gives" in f.reason]) == 1


def test_edited_privacy_ledger(fed: Federation) -> None:
    ledger = next(
        p for p in fed.ledger_dir.glob("privacy-ledger-*.json") if json.loads(p.read_text())["hospital"] == "Cleveland"
    )
    data = json.loads(ledger.read_text())
    data["history"][-1][2] -= 3  # hide one round of steps
    ledger.write_text(json.dumps(data))
    report = verify(fed.logs, fed.ledger_dir)
    found = any(f.file == str(ledger) and f.line == 0 and "differs from the" in f.reason for f in report.errors)
    assert found, _explain(report)
    ledger.write_text("{not json")
    report = verify(fed.logs, fed.ledger_dir)
    assert any(f.file == str(ledger) and "unreadable privacy ledger" in f.reason for f in report.errors)


def test_server_lists_a_node_without_release(tmp_path: Path) -> None:
    fed = build_federation(tmp_path, skip_release=("Cleveland", 2))
    report = verify(fed.logs)
    assert _has(report, fed.server_log, 3, "Cleveland as responded in run 4242 round 2"), _explain(report)
    # the hidden release also shows in the epsilon: the next claim includes steps the log lacks
    assert _has(report, fed.node_logs["Cleveland"], 5, "RDP accountant gives")


def test_release_missing_from_server_round(tmp_path: Path) -> None:
    fed = build_federation(tmp_path, hide_from_server=("Cleveland", 1))
    report = verify(fed.logs)
    assert _has(report, fed.node_logs["Cleveland"], 2, "does not list it as responded"), _explain(report)


def test_model_received_must_be_the_servers(fed: Federation, tmp_path: Path) -> None:
    # A node log for another hospital that trained on a model the server never sent.
    log = AuditLog(tmp_path / "node-x.jsonl", load_or_create_key(tmp_path / "keys" / "Cleveland.pem"), "Cleveland")
    lines = _lines(fed.node_logs["Cleveland"])
    for raw in lines:
        line = json.loads(raw)
        body = line["body"]
        if line["kind"] == "release" and body["round"] == 2:
            body["global_model_digest"] = "f" * 64
        log.append(line["kind"], body)
    report = verify([log.path, fed.node_logs["Hungary"], fed.node_logs["Switzerland"], fed.server_log])
    assert any(
        f.file == str(log.path) and "not the server's global model for round 2" in f.reason for f in report.errors
    ), _explain(report)


def test_garbage_never_raises(tmp_path: Path) -> None:
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b'\xff\xfe not json\n{"seq": "1"}\n[1,2]\n\n' + bytes(range(256)))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    wrong = tmp_path / "wrong.jsonl"
    fields = ("seq", "time", "actor", "kind", "prev", "body", "pubkey", "sig")
    wrong.write_text(json.dumps({k: None for k in fields}) + "\n")
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    (ledgers / "privacy-ledger-x.json").write_text('{"fingerprint": 3, "history": [[1, 2]]}')
    report = verify([junk, empty, wrong, tmp_path / "missing.jsonl"], ledgers)
    assert not report.ok
    assert _has(report, junk, 1, "not valid JSON")
    assert _has(report, junk, 2, "does not verify")
    assert _has(report, tmp_path / "missing.jsonl", 0, "cannot read")
    assert _has(report, wrong, 1, "does not verify")
    assert any("unreadable privacy ledger" in f.reason for f in report.errors)


def test_malformed_body_with_valid_signature(tmp_path: Path) -> None:
    """A node that signs a nonsense release is reported, not trusted."""
    key = load_or_create_key(tmp_path / "k.pem")
    from audit.signing import public_key_bytes, sign

    line = {
        "seq": 0,
        "time": "t",
        "actor": "A",
        "kind": "release",
        "prev": "0" * 64,
        "body": {"run_id": RUN, "round": 1},
        "pubkey": public_key_bytes(key).hex(),
    }
    line["sig"] = sign(key, canonical_json(line)).hex()
    path = tmp_path / "a.jsonl"
    path.write_bytes(canonical_json(line) + b"\n")
    report = verify([path])
    assert _has(report, path, 1, "malformed record"), _explain(report)


def test_replay_equals_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    from audit.verify import _epsilon
    from client.privacy_ledger import ALPHAS

    history = [(STATS_SIGMA, 1.0, 1), (TRAIN_SIGMA, 1 / 7, 21), (1.3, 0.05, 200), (TRAIN_SIGMA, 1 / 7, 7)]
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert _epsilon(history, DELTA) == pytest.approx(accountant.get_epsilon(delta=DELTA, alphas=ALPHAS), rel=1e-12)


# ---- a crashed and resumed run, re-sent answers, budgets, several ledger folders ------------------------
def _resumed(tmp_path: Path, **changes) -> Federation:
    """The coordinator dies after logging round 2 (hospitals already released round 3); the run is resumed
    as run 4343 from the round-2 checkpoint, and the statistics answer is re-sent at no cost."""
    fed = build_federation(tmp_path, server_stops_after=changes.pop("server_stops_after", 2))
    return build_federation(
        tmp_path,
        reuse=fed,
        run_id="4343",
        first_round=3,
        resumed_from=RUN,
        resend_stats=changes.pop("resend_stats", lambda paid: paid),
        **changes,
    )


def test_a_crashed_and_resumed_run_verifies_clean_with_a_note_for_the_round_in_flight(tmp_path: Path) -> None:
    fed = _resumed(tmp_path)
    report = verify(fed.logs, fed.ledger_dir)
    assert report.ok, _explain(report)
    crashed = [f for f in report.notes if "charged, not aggregated (server crash)" in f.reason]
    assert sorted(Path(f.file).name for f in crashed) == ["node-Cleveland.jsonl", "node-Hungary.jsonl"], _explain(
        report
    )
    assert all("run 4242 round 3" in f.reason for f in crashed)


def test_only_the_round_in_flight_when_the_server_stopped_is_a_note(tmp_path: Path) -> None:
    fed = build_federation(tmp_path, server_stops_after=1)  # rounds 2 and 3 released, neither logged
    report = verify(fed.logs, fed.ledger_dir)
    assert any("run 4242 round 2: charged, not aggregated (server crash)" in f.reason for f in report.notes)
    assert _has(
        report, fed.node_logs["Cleveland"], 6, "released in run 4242 round 3, but the server logged no such round"
    ), _explain(report)


def test_a_free_statistics_answer_must_be_one_paid_for_earlier(tmp_path: Path) -> None:
    fed = _resumed(tmp_path, resend_stats=lambda paid: "0" * 64)  # something else, sent at zero steps
    report = verify(fed.logs, fed.ledger_dir)
    assert any(
        "at no privacy cost in run 4343, but it is not an answer it paid for" in f.reason for f in report.errors
    ), _explain(report)


def test_two_consecutive_runs_sharing_ledgers_verify_clean(fed: Federation) -> None:
    build_federation(fed.root, run_id="4343", reuse=fed, resend_stats=lambda paid: paid)
    report = verify(fed.logs, fed.ledger_dir)
    assert report.ok, _explain(report)


def _raise_by_hand(ledger: Path, to: float) -> None:
    data = json.loads(ledger.read_text())
    data["budget"] = to
    ledger.write_text(json.dumps(data))


def _ledger_of(fed: Federation, hospital: str) -> Path:
    digest = hashlib.sha256(hospital.encode()).hexdigest()
    return next(
        p for p in fed.ledger_dir.glob("privacy-ledger-*.json") if json.loads(p.read_text())["dataset_id"] == digest
    )


def test_a_ledger_budget_raised_by_hand_fails_against_the_signed_budget(fed: Federation, tmp_path: Path) -> None:
    _raise_by_hand(_ledger_of(fed, "Hungary"), 50.0)
    report = verify(fed.logs, fed.ledger_dir)
    assert any(
        "Hungary: the ledger's budget 50 is above the 10 last signed" in f.reason and "raised by hand" in f.reason
        for f in report.errors
    ), _explain(report)
    # a ledger with no release yet (its hospital refused everything) is checked against its signed budget too
    log = AuditLog(fed.node_logs["Cleveland"], load_or_create_key(fed.root / "keys" / "Cleveland.pem"), "Cleveland")
    log.budget(BudgetRecord("cleveland-second-table", 2.0, None, "initial"))
    PrivacyLedger.open(fed.ledger_dir, "Cleveland", "cleveland-second-table", budget=2.0, delta=DELTA)
    assert verify(fed.logs, fed.ledger_dir).ok is False
    _raise_by_hand(_ledger_of(fed, "Hungary"), 10.0)
    assert verify(fed.logs, fed.ledger_dir).ok
    second = next(p for p in fed.ledger_dir.glob("privacy-ledger-cleveland-second-table-*.json"))
    _raise_by_hand(second, 9.0)
    report = verify(fed.logs, fed.ledger_dir)
    assert any("Cleveland: the ledger's budget 9 is above the 2 last signed" in f.reason for f in report.errors), (
        _explain(report)
    )


def test_a_ledger_whose_budget_was_never_signed_fails(tmp_path: Path) -> None:
    fed = build_federation(tmp_path, sign_budget=False)
    report = verify(fed.logs, fed.ledger_dir)
    assert sum("has no signed budget record" in f.reason for f in report.errors) == 3, _explain(report)


def test_cli_verifies_every_ledger_folder_given(fed: Federation, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedcare.audit_commands import audit_app

    # a deployment: one ledger folder per hospital
    folders = []
    for h in HOSPITALS:
        folder = tmp_path / f"state-{h}"
        folder.mkdir()
        shutil.move(_ledger_of(fed, h), folder)
        folders += ["--ledger-dir", str(folder)]
    logs = [str(p) for p in fed.logs]
    result = CliRunner().invoke(audit_app, ["verify", *logs, *folders, "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["ledgers"]) == 3
    _raise_by_hand(next((tmp_path / "state-Cleveland").glob("privacy-ledger-*.json")), 40.0)  # the first folder
    result = CliRunner().invoke(audit_app, ["verify", *logs, *folders])
    assert result.exit_code == 1 and "Cleveland: the ledger's budget 40 is above the 10" in result.output, result.output
