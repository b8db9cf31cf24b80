"""The multi-site benchmark's bar check: which hospitals it compares, and when a table has signal."""

from __future__ import annotations

import numpy as np

from bench.bench_multisite_accuracy import chance_bound, summarise


def _run(local: float, fed: float, central: float = 0.7) -> dict:
    def hospital(name: str, test_n: int) -> dict:
        return {
            "name": name,
            "site": name,
            "test_n": test_n,
            "fed": fed,
            "personalised": fed,
            "has_personalised": True,
            "local": local,
            "central": central,
        }

    pooled = {"test_n": 400, "fed": fed, "personalised": fed, "local": local, "central": central}
    return {"hospitals": [hospital("big", 300), hospital("few-positives", 100)], "pooled": pooled}


def test_the_bar_compares_only_hospitals_with_ten_patients_of_each_class():
    runs = [_run(local=0.80, fed=0.70), _run(local=0.81, fed=0.70)]
    _, check = summarise("t", "no DP", runs, positives=[40, 6])
    assert "1 of 2 hospitals" in check
    assert "big (-0.105 ± 0.005, measurably)" in check  # paired per split: -0.10, -0.11
    assert "few-positives" not in check


def test_a_gap_within_its_standard_error_is_reported_but_not_measurable():
    runs = [_run(local=0.80, fed=0.70), _run(local=0.80, fed=0.86)]  # -0.10 then +0.06
    _, check = summarise("t", "no DP", runs, positives=[40, 6])
    assert "big (-0.020 ± 0.080)" in check
    assert "measurably" not in check.split("big")[1].split(")")[0]


def test_a_table_has_signal_only_above_chance_by_two_null_standard_errors():
    _, check = summarise("t", "DP eps=1", [_run(local=0.5, fed=0.5, central=0.55)], positives=[40, 6])
    assert "no signal" in check  # 46 positives among 400: the bound is 0.5 + 2 x 0.045
    _, check = summarise("t", "DP eps=1", [_run(local=0.5, fed=0.5, central=0.65)], positives=[40, 6])
    assert "signal" in check and "no signal" not in check


def test_the_chance_bound_is_exceeded_by_random_scores_about_2_percent_of_the_time():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(200)]
    bound = chance_bound(len(y), 20)
    aucs = []
    for _ in range(4000):
        scores = rng.random(len(y))
        ranks = scores.argsort().argsort() + 1
        aucs.append((ranks[y == 1].sum() - 20 * 21 / 2) / (20 * 200))
    assert 0.01 < np.mean(np.array(aucs) > bound) < 0.04
