"""`audit.report` and `fedcare audit report`: the ethics-board datasheet renders what was verified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.report import write_report
from fedcare.audit_commands import audit_app
from tests.support.audit_federation import HOSPITALS, Federation, build_federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return build_federation(tmp_path_factory.mktemp("federation"))


def _row(markdown: str, hospital: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(f"| {hospital} | `"))


def test_report_lists_epsilon_per_hospital_and_controls(fed: Federation, tmp_path: Path) -> None:
    md_path = write_report(fed.logs, tmp_path / "out", ledger_dir=fed.ledger_dir)
    png = tmp_path / "out" / "epsilon.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = md_path.read_text()
    assert "**Verification: PASSED** (0 error(s), 0 note(s))" in md
    assert "![epsilon per hospital over releases](epsilon.png)" in md
    for hospital in HOSPITALS:
        row = _row(md, hospital)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"`{hashlib.sha256(hospital.encode()).hexdigest()[:12]}`"
        assert cells[5] == f"{fed.final_epsilon[hospital]:.4f}"  # replayed epsilon = the ledger's
        assert cells[6] == f"{fed.final_epsilon[hospital]:.4f}"  # last claimed
        releases = "3 / 0" if hospital == "Switzerland" else "4 / 0"
        assert cells[2] == releases and cells[3] == ("1" if hospital == "Switzerland" else "0")
        assert f"### {hospital}" in md
    assert "| Switzerland | 4242 | 3 | budget | Switzerland: budget 1.00 exhausted after round 2 |" in md
    assert "| secagg-threshold | 2 |" in md and "| tls | yes |" in md and "| node-auth | yes |" in md
    assert "secure-aggregation threshold 2, fewest survivors in a round 2" in md
    assert "DP-SGD on 8 training release(s): noise multiplier 2.5-2.5" in md
    assert "None: every chain, signature, cross-reference and epsilon checked out." in md


def test_report_of_a_tampered_log_says_failed(fed: Federation, tmp_path: Path) -> None:
    copy = tmp_path / "server.jsonl"
    lines = fed.server_log.read_bytes().split(b"\n")
    lines[1], lines[2] = lines[2], lines[1]
    copy.write_bytes(b"\n".join(lines))
    md = write_report([*fed.node_logs.values(), copy], tmp_path / "out").read_text()
    assert "**Verification: FAILED**" in md
    assert f"| error | {copy} | 2 | seq 2 where 1 was expected" in md


def test_report_without_dp_releases_still_renders(tmp_path: Path) -> None:
    from audit.audit_log import AuditLog, ReleaseRecord
    from audit.signing import load_or_create_key

    log = AuditLog(tmp_path / "n.jsonl", load_or_create_key(tmp_path / "k.pem"), "Local")
    log.release(ReleaseRecord("1", 1, "train", "a" * 64, "f" * 64, "b" * 64, "c" * 64, None, None))
    md = write_report([log.path], tmp_path / "out").read_text()
    assert "1 release(s) without differential privacy" in md
    assert (tmp_path / "out" / "epsilon.png").exists()


def test_cli_verify_and_report(fed: Federation, tmp_path: Path) -> None:
    runner = CliRunner()
    logs = [str(p) for p in fed.logs]
    result = runner.invoke(audit_app, ["verify", *logs, "--ledger-dir", str(fed.ledger_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] and data["hospitals"]["Hungary"]["releases"] == 4
    result = runner.invoke(audit_app, ["verify", *logs])
    assert result.exit_code == 0 and "ok" in result.output and "Cleveland" in result.output
    result = runner.invoke(audit_app, ["report", *logs, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0 and (tmp_path / "r" / "audit-report.md").exists()
    # findings -> 1; usage errors -> 2
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(fed.node_logs["Cleveland"].read_bytes().replace(b'"round":1', b'"round":9', 1))
    result = runner.invoke(audit_app, ["verify", bad.as_posix(), *logs[1:]])
    assert result.exit_code == 1 and "signature does not verify" in result.output
    assert runner.invoke(audit_app, ["verify", str(tmp_path / "missing.jsonl")]).exit_code == 2
    assert runner.invoke(audit_app, ["verify", *logs, "--ledger-dir", str(tmp_path / "none")]).exit_code == 2
    assert runner.invoke(audit_app, ["verify"]).exit_code == 2
