"""Real `fedcare simulate` runs on Flower's Simulation Engine (Ray, loopback only)."""

import contextlib
import ipaddress
import json
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from client.privacy_ledger import PrivacyLedger
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _simulate(*args: str, listeners: set | None = None) -> subprocess.CompletedProcess:
    """Run `fedcare simulate`; collect every listening address of its process tree meanwhile."""
    cmd = [sys.executable, "-m", "fedcare.cli", "simulate", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while listeners is not None and proc.poll() is None and time.monotonic() < deadline:
        tree = set()
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
                listeners.add(conn.laddr.ip)
        time.sleep(0.5)
    out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _fedcare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedcare.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_dp_simulation_end_to_end_then_budget_refusal_on_the_same_data(tmp_path):
    out, ledgers = tmp_path / "run1", tmp_path / "ledgers"
    listeners: set = set()
    done = _simulate(
        "--rounds",
        "2",
        "--epsilon",
        "1.0",
        "--seed",
        "3",
        "--output-dir",
        str(out),
        "--ledger-dir",
        str(ledgers),
        listeners=listeners,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert listeners, "Ray started no listening service?"
    assert all(_is_loopback(ip) for ip in listeners), listeners  # Ray stays on loopback
    assert "round  1/2" in done.stdout and "round  2/2" in done.stdout
    assert "secure aggregation: keys agreed with 4 hospitals" in done.stdout  # on by default
    assert not [p for p in ledgers.glob("secagg/**/*") if p.is_file()]  # round keys deleted after the run
    for name in HOSPITALS:
        assert name in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert set(results["final"]) == set(HOSPITALS) | {"pooled"}
    assert results["final"]["pooled"]["n"] == 254
    assert 0.5 < results["final"]["pooled"]["accuracy"] <= 1.0
    for name in HOSPITALS:
        eps = results["hospitals"][name]["epsilon"]
        assert 0.9 < eps <= 1.0 + 1e-9  # the planned budget, spent exactly, never exceeded
        assert results["table"]["hospitals"][HOSPITALS.index(name)]["local"]["n"] > 0
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert set(np.load(out / "final_model.npz").files) == {"linear.weight", "linear.bias"}

    files = sorted(ledgers.glob("privacy-ledger-*.json"))
    assert len(files) == 4
    claimed = sorted(h["epsilon"] for h in results["hospitals"].values())
    on_disk = sorted(PrivacyLedger(f, json.loads(f.read_text())).epsilon() for f in files)
    assert np.allclose(claimed, on_disk, rtol=1e-12)

    # The auditor: every log verifies offline, and replays to the epsilon the final table showed.
    logs = [*sorted((ledgers / "audit").glob("*.jsonl")), out / "audit" / "server.jsonl"]
    assert len(logs) == 5
    audit = _fedcare("audit", "verify", *map(str, logs), "--ledger-dir", str(ledgers), "--json")
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    verified = json.loads(audit.stdout)
    for name in HOSPITALS:
        (replayed,) = verified["hospitals"][name]["epsilon"].values()
        assert replayed == pytest.approx(results["hospitals"][name]["epsilon"], rel=1e-9)
    report = _fedcare("audit", "report", *map(str, logs), "--out", str(tmp_path / "audit"))
    assert report.returncode == 0 and (tmp_path / "audit" / "epsilon.png").is_file()
    text = (tmp_path / "audit" / "audit-report.md").read_text()
    assert all(name in text for name in HOSPITALS)
    tampered = logs[0].read_bytes().replace(b'"round":1', b'"round":3', 1)
    logs[0].write_bytes(tampered)
    broken = _fedcare("audit", "verify", *map(str, logs))
    assert broken.returncode == 1 and logs[0].name in broken.stdout + broken.stderr

    again = _simulate(
        "--rounds", "2", "--epsilon", "1.0", "--output-dir", str(tmp_path / "run2"), "--ledger-dir", str(ledgers)
    )
    assert again.returncode == 1  # the run has a problem (README "Exit codes")
    text = " ".join((again.stdout + again.stderr).split())
    assert "budget 1.00 exhausted after round 2" in text
    assert "Traceback" not in text
    after = sorted(PrivacyLedger(f, json.loads(f.read_text())).epsilon() for f in files)
    assert after == on_disk  # a refused run spends nothing
