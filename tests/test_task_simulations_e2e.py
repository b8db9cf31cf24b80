"""`fedcare simulate` on the sequence and imaging tasks: real Simulation Engine runs over data that
went through the same on-disk loaders a hospital's node uses (events CSV + schema; DICOM + labels)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def _simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedcare.cli", "simulate", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def _check_run(done: subprocess.CompletedProcess, out, hospitals: list[str], rounds: int, epsilon: float) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert f"round  {rounds}/{rounds}" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == list(range(1, rounds + 1))
    assert set(results["final"]) == set(hospitals) | {"pooled"}
    for name in hospitals:
        spent = results["hospitals"][name]["epsilon"]
        assert 0 < spent <= epsilon + 1e-6
    assert (out / "training_curves.png").stat().st_size > 0
    return results


def test_pbc2_sequences_train_a_dp_gru_across_hospitals(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    done = _simulate(
        "--dataset",
        "pbc2",
        "--hospitals",
        "2",
        "--rounds",
        "2",
        "--epsilon",
        "2",
        "--data-root",
        str(data),
        "--output-dir",
        str(out),
        "--no-local-baseline",
    )
    results = _check_run(done, out, ["hospital-0", "hospital-1"], rounds=2, epsilon=2.0)
    assert "gru" in done.stdout
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == ["hospital-0", "hospital-1"]
    assert (data / "hospital-0" / "events.csv").is_file() and (data / "hospital-0" / "schema.toml").is_file()
    pooled = results["final"]["pooled"]
    assert 0.0 <= pooled["auc"] <= 1.0 and pooled["n"] > 50


def test_synthetic_dicom_hospitals_train_a_dp_cnn_from_decoded_and_cached_files(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    done = _simulate(
        "--dataset",
        "synthetic-imaging",
        "--hospitals",
        "2",
        "--rounds",
        "2",
        "--epsilon",
        "3",
        "--data-root",
        str(data),
        "--output-dir",
        str(out),
        "--no-local-baseline",
    )
    results = _check_run(done, out, ["hospital-0", "hospital-1"], rounds=2, epsilon=3.0)
    assert "cnn" in done.stdout
    assert len(list((data / "hospital-0" / "images").glob("*.dcm"))) > 50
    cached = list((data / ".fedcare-cache").rglob("*"))
    assert any(p.is_file() for p in cached), "decoded images were not cached"
    assert results["final"]["pooled"]["n"] == sum(results["final"][h]["n"] for h in ("hospital-0", "hospital-1"))


@pytest.mark.parametrize(
    "patches", [(), ("--patch-size", "16x16x12", "--patches-per-study", "2")], ids=["whole", "patches"]
)
def test_synthetic_ct_segmentation_trains_a_dp_unet_and_reports_dice_per_hospital(tmp_path, patches):
    """`--task segment`: the hospitals read their SEG masks, train the U-Net with DP-Adam through
    secure aggregation, and the run reports Dice, HD95 and lesion detection per hospital, beside a
    local-only model trained on the same masks; on whole volumes or on patches (a study's patches
    one DP sample, whole volumes predicted window by window)."""
    out, data = tmp_path / "run", tmp_path / "data"
    small = "from simulation import synthetic_ct; synthetic_ct.STUDIES_PER_HOSPITAL = (14, 12)"  # small hospitals
    done = subprocess.run(
        [sys.executable, "-c", f"{small}; from fedcare.cli import app; app()", "simulate",
         "--dataset", "synthetic-ct", "--task", "segment", "--hospitals", "2", "--rounds", "2",
         "--local-epochs", "1", "--batch-size", "4", "--data-root", str(data), "--output-dir", str(out), *patches],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    results = _check_run(done, out, ["hospital-0", "hospital-1"], rounds=2, epsilon=8.0)
    assert "unet3d" in done.stdout and "pooled Dice" in done.stdout
    table = done.stdout.split("per hospital test split")[-1]
    assert "Dice" in table and "HD95" in table
    for name in ("hospital-0", "hospital-1", "pooled"):
        final = results["final"][name]
        assert 0.0 <= final["dice"] <= 1.0 and final["n"] > 0  # Dice over the studies with a lesion
    assert results["settings"]["task"] == "segment" and results["settings"]["local-optimizer"] == "adam"
    assert results["settings"]["patch-size"] == (patches[1] if patches else "")
