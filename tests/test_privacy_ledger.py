import json

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.dp_trainer import DPSettings, train
from client.secret_randomness import SecretRandom
from client.privacy_ledger import ALPHAS, PrivacyLedger, calibrate_noise, epsilon_of
from fedcare.errors import BudgetExhausted, FedcareError
from shared_models.registry import build_model

FP = "f" * 64


def _ledger(tmp_path, budget=1.0, delta=1e-4, fp=FP):
    return PrivacyLedger.open(tmp_path, "Hungary", fp, budget=budget, delta=delta)


def test_plan_spends_exactly_the_target_and_no_more(tmp_path):
    ledger = _ledger(tmp_path)
    plan = ledger.plan_run("run-1", rounds=10, steps_per_round=11, sample_rate=1 / 11, run_epsilon=1.0,
                           stats_fraction=0.1)
    full = [(plan.stats_noise_multiplier, 1.0, 1), (plan.noise_multiplier, plan.sample_rate, 110)]
    assert 0.99 < epsilon_of(full, 1e-4) <= 1.0
    assert ledger.plan("run-1") == plan  # calibrated once, reused for every round
    reopened = _ledger(tmp_path)
    assert reopened.plan("run-1") == plan


@pytest.mark.parametrize("prefix, release, delta, target", [
    ([], (1 / 7, 105), 1e-4, 0.3),
    ([(5.0, 1.0, 1)], (1 / 9, 135), 1e-4, 1.0),
    ([], (0.1, 450), 1e-5, 8.0),       # the best RDP order moves between bracket and answer
    ([(1.2, 0.1, 300)], (0.1, 100), 1e-4, 30.0),
])
def test_calibrated_noise_is_the_smallest_that_keeps_the_target_under_all_orders(prefix, release, delta, target):
    sigma = calibrate_noise(prefix, release, delta, target)
    q, steps = release
    assert epsilon_of(prefix + [(sigma, q, steps)], delta) <= target
    assert epsilon_of(prefix + [(sigma * (1 - 1e-5), q, steps)], delta) > target


def test_epsilon_from_ledger_reloaded_each_round_equals_one_long_lived_accountant(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 15)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    sigma, rounds = 1.3, 4
    # one engine living across all rounds
    model = build_model("logistic", 15)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(torch.tensor(x), torch.tensor(y, dtype=torch.float32)), batch_size=16)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=loader, noise_multiplier=sigma, max_grad_norm=1.0)
    for _ in range(rounds):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb).backward() if len(yb) else None
            opt.step()
    # the ledger, reopened from disk before every round, with a fresh engine per round
    for rnd in range(1, rounds + 1):
        ledger = _ledger(tmp_path, budget=100.0)
        outcome = train(build_model("logistic", 15), x, y, epochs=1, batch_size=16, lr=0.1,
                        dp=DPSettings(sigma, 1.0), rng=SecretRandom.reproducible(rnd))
        ledger.record("run-1", rnd, "train", outcome.steps)
    reloaded = _ledger(tmp_path, budget=100.0)
    assert reloaded.history == [(sigma, 1 / 8, rounds * 8)]
    assert reloaded.epsilon() == pytest.approx(engine.accountant.get_epsilon(1e-4, alphas=ALPHAS), rel=1e-12)


def test_budget_is_enforced_across_runs_with_a_clear_refusal(tmp_path):
    ledger = _ledger(tmp_path, budget=1.0)
    plan = ledger.plan_run("run-1", rounds=3, steps_per_round=5, sample_rate=0.2, run_epsilon=1.0, stats_fraction=None)
    for rnd in (1, 2, 3):
        ledger.check_release([(plan.noise_multiplier, plan.sample_rate, 5)])
        eps = ledger.record("run-1", rnd, "train", [(plan.noise_multiplier, plan.sample_rate, 5)])
    assert eps == pytest.approx(1.0, abs=0.01)
    # a round beyond the plan would exceed the budget
    with pytest.raises(BudgetExhausted, match="Hungary: budget 1.00 exhausted after round 3 of run run-1"):
        ledger.check_release([(plan.noise_multiplier, plan.sample_rate, 5)])
    # a new run on the same data (fresh process) is refused before it spends anything
    again = _ledger(tmp_path, budget=1.0)
    with pytest.raises(BudgetExhausted, match="budget 1.00 exhausted after round 3"):
        again.plan_run("run-2", rounds=3, steps_per_round=5, sample_rate=0.2, run_epsilon=1.0, stats_fraction=0.1)
    # the hospital may grant more; the new run is then calibrated against what remains
    more = _ledger(tmp_path, budget=2.0)
    plan2 = more.plan_run("run-2", rounds=3, steps_per_round=5, sample_rate=0.2, run_epsilon=1.0, stats_fraction=None)
    assert epsilon_of(more.history + [(plan2.noise_multiplier, 0.2, 15)], 1e-4) <= 2.0 + 1e-9
    assert json.loads(more.path.read_text())["budget_changes"][0]["to"] == 2.0


def test_delta_of_a_ledger_cannot_change(tmp_path):
    _ledger(tmp_path, delta=1e-4)
    with pytest.raises(FedcareError, match="uses delta=0.0001, this run asks delta=1e-05"):
        _ledger(tmp_path, delta=1e-5)


def test_corrupt_ledger_refuses_instead_of_resetting(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.path.write_text("{ not json")
    with pytest.raises(FedcareError, match="unreadable"):
        _ledger(tmp_path)


def test_statistics_release_is_paid_once_then_reused(tmp_path):
    ledger = _ledger(tmp_path, budget=3.0)
    ledger.record("run-1", 0, "feature-stats", [(8.0, 1.0, 1)], stats_key="k", values={"count": [10.0]})
    spent = ledger.epsilon()
    assert _ledger(tmp_path, budget=3.0).feature_stats("k") == {"count": [10.0]}
    assert _ledger(tmp_path, budget=3.0).feature_stats("other") is None
    assert _ledger(tmp_path, budget=3.0).epsilon() == spent > 0
