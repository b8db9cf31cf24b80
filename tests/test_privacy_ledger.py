import json

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.dp_trainer import DPSettings, train
from client.privacy_ledger import ALPHAS, PrivacyLedger, calibrate_noise, epsilon_of
from client.secret_randomness import SecretRandom
from fedcare.errors import BudgetExhausted, FedcareError
from shared_models.registry import build_model

FP = "f" * 64


def _ledger(tmp_path, budget=1.0, delta=1e-4, fp=FP):
    return PrivacyLedger.open(tmp_path, "Hungary", fp, budget=budget, delta=delta)


def test_plan_spends_exactly_the_target_and_no_more(tmp_path):
    ledger = _ledger(tmp_path)
    plan = ledger.plan_run(
        "run-1", rounds=10, steps_per_round=11, sample_rate=1 / 11, run_epsilon=1.0, stats_fraction=0.1
    )
    full = [(plan.stats_noise_multiplier, 1.0, 1), (plan.noise_multiplier, plan.sample_rate, 110)]
    assert 0.99 < epsilon_of(full, 1e-4) <= 1.0
    assert ledger.plan("run-1") == plan  # calibrated once, reused for every round
    reopened = _ledger(tmp_path)
    assert reopened.plan("run-1") == plan


@pytest.mark.parametrize(
    "prefix, release, delta, target",
    [
        ([], (1 / 7, 105), 1e-4, 0.3),
        ([(5.0, 1.0, 1)], (1 / 9, 135), 1e-4, 1.0),
        ([], (0.1, 450), 1e-5, 8.0),  # the best RDP order moves between bracket and answer
        ([(1.2, 0.1, 300)], (0.1, 100), 1e-4, 30.0),
    ],
)
def test_calibrated_noise_is_the_smallest_that_keeps_the_target_under_all_orders(prefix, release, delta, target):
    sigma = calibrate_noise(prefix, release, delta, target)
    q, steps = release
    assert epsilon_of([*prefix, (sigma, q, steps)], delta) <= target
    assert epsilon_of([*prefix, (sigma * (1 - 1e-05), q, steps)], delta) > target


def test_epsilon_from_ledger_reloaded_each_round_equals_one_long_lived_accountant(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 15)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    sigma, rounds = 1.3, 4
    # one engine living across all rounds
    model = build_model("logistic", 15)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(torch.tensor(x), torch.tensor(y, dtype=torch.float32)), batch_size=16)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
    )
    for _ in range(rounds):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb).backward() if len(yb) else None
            opt.step()
    # the ledger, reopened from disk before every round, with a fresh engine per round
    for rnd in range(1, rounds + 1):
        ledger = _ledger(tmp_path, budget=100.0)
        outcome = train(
            build_model("logistic", 15),
            x,
            y,
            epochs=1,
            batch_size=16,
            lr=0.1,
            dp=DPSettings(sigma, 1.0),
            rng=SecretRandom.reproducible(rnd),
        )
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
    with pytest.raises(BudgetExhausted, match=r"Hungary: budget 1.00 exhausted after round 3 of run run-1"):
        ledger.check_release([(plan.noise_multiplier, plan.sample_rate, 5)])
    # a new run on the same data (fresh process) is refused before it spends anything
    again = _ledger(tmp_path, budget=1.0)
    with pytest.raises(BudgetExhausted, match=r"budget 1.00 exhausted after round 3"):
        again.plan_run("run-2", rounds=3, steps_per_round=5, sample_rate=0.2, run_epsilon=1.0, stats_fraction=0.1)
    # the hospital may grant more; the new run is then calibrated against what remains
    more = _ledger(tmp_path, budget=2.0)
    plan2 = more.plan_run("run-2", rounds=3, steps_per_round=5, sample_rate=0.2, run_epsilon=1.0, stats_fraction=None)
    assert epsilon_of([*more.history, (plan2.noise_multiplier, 0.2, 15)], 1e-4) <= 2.0 + 1e-9
    assert json.loads(more.path.read_text())["budget_changes"][0]["to"] == 2.0


def test_delta_of_a_ledger_cannot_change(tmp_path):
    _ledger(tmp_path, delta=1e-4)
    with pytest.raises(FedcareError, match=r"uses delta=0.0001, this run asks delta=1e-05"):
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


def test_a_round_paid_twice_after_a_crash_is_replanned_within_the_runs_target(tmp_path):
    ledger = _ledger(tmp_path, budget=1.0)
    plan = ledger.plan_run(
        "run-1", rounds=4, steps_per_round=11, sample_rate=1 / 11, run_epsilon=1.0, stats_fraction=0.1
    )
    ledger.record(
        "run-1", 0, "feature-stats", [(plan.stats_noise_multiplier, 1.0, 1)], stats_key="k", values={"sum": []}
    )

    def train_round(run_id: str, rnd: int) -> float:
        used, _ = ledger.plan_for_round("run-1", rnd)
        ledger.check_release([(used.noise_multiplier, used.sample_rate, used.steps_per_round)])
        ledger.record(
            run_id, rnd, "train", [(used.noise_multiplier, used.sample_rate, used.steps_per_round)], plan_run_id="run-1"
        )
        return used.noise_multiplier

    for rnd in (1, 2):  # the run as planned: no re-plan
        assert train_round("run-1", rnd) == plan.noise_multiplier
    assert ledger.replans("run-1") == []
    # the coordinator crashed after round 2 was charged; its resumed run (a new Flower run) asks round 2 again
    used, replan = ledger.plan_for_round("run-1", 2)
    assert replan is not None and replan.lost_rounds == (2,) and replan.from_round == 2
    assert replan.previous_noise_multiplier == plan.noise_multiplier < replan.noise_multiplier == used.noise_multiplier
    for rnd in (2, 3, 4):
        assert train_round("run-2", rnd) == replan.noise_multiplier  # the re-plan holds for the rest of the run
    assert 0.99 < ledger.epsilon() <= plan.target_epsilon + 1e-9
    assert len(ledger.replans("run-1")) == 1 and ledger.charged_rounds("run-1") == [1, 2, 2, 3, 4]
    assert PrivacyLedger.open(tmp_path, "Hungary", FP, budget=1.0, delta=1e-4).replans("run-1") == [replan]


def test_a_replan_that_cannot_fit_refuses_with_the_reason(tmp_path):
    ledger = _ledger(tmp_path, budget=1.0)
    plan = ledger.plan_run(
        "run-1", rounds=2, steps_per_round=11, sample_rate=1 / 11, run_epsilon=1.0, stats_fraction=None
    )
    ledger.record("run-1", 1, "train", [(plan.noise_multiplier, plan.sample_rate, 22)])  # everything, spent
    with pytest.raises(BudgetExhausted, match=r"the rounds left of run run-1 .from round 2. no longer fit"):
        ledger.plan_for_round("run-1", 2)


def test_the_plan_counts_exactly_the_steps_the_trainer_takes_where_opacus_would_take_one_fewer(tmp_path):
    from client.dp_trainer import steps_per_epoch
    from client.secret_randomness import SecretPoissonBatches

    fewer = [k for k in range(1, 5000) if int(1 / (1 / k)) != k]  # Opacus's loader: int(1 / sample_rate) steps
    assert len(fewer) == 312
    for k in fewer:  # the steps the plan counts are the batches the hospital's sampler draws
        steps = steps_per_epoch(k * 8, 8)
        assert (
            steps == k
            and len(
                SecretPoissonBatches(
                    torch.zeros(1, 1), torch.zeros(1), 1 / steps, steps, SecretRandom.reproducible(0, "len")
                )
            )
            == k
        )
    for i, k in enumerate(fewer[:4]):  # ... and a ledger trained with them ends within its plan
        ledger = _ledger(tmp_path / str(k), budget=1.0)
        x = np.random.default_rng(k).normal(size=(k * 2, 3)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.float32)
        steps = steps_per_epoch(len(y), 2)
        plan = ledger.plan_run(
            "run", rounds=2, steps_per_round=steps, sample_rate=1 / steps, run_epsilon=1.0, stats_fraction=None
        )
        model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
        for rnd in (1, 2):
            outcome = train(
                model,
                x,
                y,
                epochs=1,
                batch_size=2,
                lr=0.1,
                dp=DPSettings(plan.noise_multiplier, 1.0),
                rng=SecretRandom.reproducible(i, "steps"),
            )
            assert sum(n for _, _, n in outcome.steps) == plan.steps_per_round == k
            ledger.record("run", rnd, "train", outcome.steps)
        assert ledger.epsilon() <= plan.target_epsilon + 1e-9


def test_training_takes_the_plans_steps_even_when_the_data_shrank_since_the_plan(tmp_path):
    from client.dp_trainer import steps_per_epoch

    ledger = _ledger(tmp_path, budget=1.0)
    steps = steps_per_epoch(931, 10)  # planned on 931 rows: 94 steps an epoch at rate 1/94
    plan = ledger.plan_run(
        "run", rounds=2, steps_per_round=steps, sample_rate=1 / steps, run_epsilon=1.0, stats_fraction=None
    )
    x = np.random.default_rng(0).normal(size=(930, 3)).astype(np.float32)  # one patient removed since
    y = (x[:, 0] > 0).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
    planned = DPSettings(plan.noise_multiplier, 1.0, plan.sample_rate, plan.steps_per_round)
    for rnd in (1, 2):
        outcome = train(
            model, x, y, epochs=1, batch_size=10, lr=0.1, dp=planned, rng=SecretRandom.reproducible(rnd, "s")
        )
        assert outcome.steps == [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
        ledger.record("run", rnd, "train", outcome.steps)
    assert ledger.epsilon() <= plan.target_epsilon + 1e-9
    # steps recomputed from the data (93 at rate 1/93) would have spent more than the plan
    recomputed = [(plan.noise_multiplier, 1 / steps_per_epoch(930, 10), 2 * steps_per_epoch(930, 10))]
    assert epsilon_of(recomputed, 1e-4) > plan.target_epsilon
