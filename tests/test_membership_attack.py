"""`audit.membership_attack` (its target: `simulation.membership_target`): LiRA finds leakage in an overfit
model and none beyond the accountant under DP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from audit.membership_attack import clopper_pearson, epsilon_lower_bound, logit_confidence, render_rows, run_lira
from simulation.membership_target import FedcareMLP, load_dataset


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_overfit_mlp_leaks_membership() -> None:
    x, y = load_dataset("digits")
    fn = FedcareMLP(hidden=256, epochs=60, batch_size=32, lr=0.3)  # no DP, no weight decay: memorises
    result = run_lira(x, y, fn, shadows=8, seed=0, dataset="digits", model="mlp-256")
    assert result.target_train_accuracy == 1.0 and result.target_test_accuracy < 0.99
    assert result.auc > 0.55
    assert result.tpr_at_1pct_fpr > 0.02  # chance would be 0.01
    assert result.accountant_epsilon is None and result.epsilon_lower_bound >= 0
    assert result.fpr_floor > 0.001 and "zero false positives" in result.note
    row = render_rows([result])[0]
    assert row[2] == "no" and row[-1] == "inf (no DP)" and row[7].endswith("(at 0 FP)")


def test_dp_lower_bound_stays_below_the_accountant() -> None:
    x, y = load_dataset("digits")
    fn = FedcareMLP(hidden=64, epochs=10, batch_size=64, lr=0.5, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    result = run_lira(
        x,
        y,
        fn,
        shadows=8,
        seed=0,
        dataset="digits",
        model="mlp-64",
        dp=True,
        accountant_epsilon=fn.last_epsilon,
        delta=1e-5,
    )
    assert result.accountant_epsilon is not None and 1.0 < result.accountant_epsilon < 20
    assert result.epsilon_lower_bound <= result.accountant_epsilon
    assert abs(result.auc - 0.5) < 0.05
    assert "WARNING" not in result.note


def test_bound_never_exceeds_what_the_sample_supports() -> None:
    rng = np.random.default_rng(1)
    members = rng.random(200) < 0.5
    perfect = members.astype(float) + rng.random(200) * 0.1  # a perfect attack on a small sample
    bound, detail = epsilon_lower_bound(members, perfect, 1e-5, 0.95, rng)
    # zero false positives among ~50 evaluation non-members cannot show an FPR below ~7%
    assert 0 < bound < math.log(1 / detail["fpr_high"]) + 1e-9 < 3.0
    positives = 0
    for seed in range(20):  # no signal -> (almost always) no bound
        r = np.random.default_rng(seed)
        m = r.random(600) < 0.5
        positives += epsilon_lower_bound(m, r.random(600), 1e-5, 0.95, r)[0] > 0
    assert positives <= 2


def test_clopper_pearson_and_logit_confidence() -> None:
    lo, hi = clopper_pearson(0, 100, 0.05)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9)
    lo, hi = clopper_pearson(50, 100, 0.05)
    assert lo < 0.5 < hi
    phi = logit_confidence(np.array([0.9, 0.9, 1.0]), np.array([1, 0, 1]))
    assert phi[0] == pytest.approx(math.log(9)) and phi[1] == pytest.approx(-math.log(9)) and np.isfinite(phi[2])
    multi = logit_confidence(np.array([[0.2, 0.8], [0.5, 0.5]]), np.array([1, 0]))
    assert multi[0] == pytest.approx(math.log(4)) and multi[1] == pytest.approx(0)


def test_cli_attack_smoke(tmp_path: Path) -> None:
    from fedcare.audit_commands import audit_app

    out = tmp_path / "attack.json"
    result = CliRunner().invoke(
        audit_app,
        [
            "attack",
            "--dataset",
            "fed-heart-disease",
            "--shadows",
            "2",
            "--epochs",
            "2",
            "--hidden-units",
            "16",
            "--json-out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["dataset"] == "fed-heart-disease" and data["n_members"] + data["n_nonmembers"] == 740
    assert "membership-inference audit" in result.output
    assert CliRunner().invoke(audit_app, ["attack", "--shadows", "3"]).exit_code == 2
    assert CliRunner().invoke(audit_app, ["attack", "--dataset", "mnist"]).exit_code == 2
