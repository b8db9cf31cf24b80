"""Real `fedcare simulate` runs on Flower's Simulation Engine (Ray, loopback only)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from client.privacy_ledger import PrivacyLedger
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")


def _simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcare.cli", "simulate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_dp_simulation_end_to_end_then_budget_refusal_on_the_same_data(tmp_path):
    out, ledgers = tmp_path / "run1", tmp_path / "ledgers"
    done = _simulate("--rounds", "2", "--epsilon", "1.0", "--seed", "3", "--output-dir", str(out),
                     "--ledger-dir", str(ledgers))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round  1/2" in done.stdout and "round  2/2" in done.stdout
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

    again = _simulate("--rounds", "2", "--epsilon", "1.0", "--output-dir", str(tmp_path / "run2"),
                      "--ledger-dir", str(ledgers))
    assert again.returncode == 2
    text = " ".join((again.stdout + again.stderr).split())
    assert "budget 1.00 exhausted after round 2" in text
    assert "Traceback" not in text
    after = sorted(PrivacyLedger(f, json.loads(f.read_text())).epsilon() for f in files)
    assert after == on_disk  # a refused run spends nothing
