"""The statistics round: what a hospital releases, and the normalisation the federation agrees on."""

import numpy as np

from client.datasets.fed_heart_disease import load_center
from client.feature_stats import contributions, local_sums, sensitivity
from server.feature_statistics import HospitalSums, pooled_normalisation


def _schema():
    h = load_center(0)
    names = h.numeric_features
    return names, [h.feature_names.index(f) for f in names], [h.feature_bounds[f] for f in names]


def _pooled(values_per_hospital, bounds, noise=None, seed=0):
    rng = np.random.default_rng(seed)
    replies = []
    for rows in values_per_hospital:
        v = local_sums(rows, bounds, noise, rng)
        replies.append(HospitalSums(len(rows), v["sum"], v["second"], v["observed"], v["noise_std"]))
    return pooled_normalisation([f"f{j}" for j in range(len(bounds))], bounds, replies)


def test_exact_statistics_round_gives_the_pooled_mean_and_standard_deviation_without_pooling_rows():
    hospitals = [load_center(i) for i in range(4)]
    names, cols, bounds = _schema()
    sums = [local_sums(h.per_patient_numeric(h.x_train), bounds, None, None) for h in hospitals]
    assert all(set(s) == {"sum", "second", "observed", "noise_std"} for s in sums)  # sums only, never rows
    norm = pooled_normalisation(
        names,
        bounds,
        [HospitalSums(len(h.y_train), s["sum"], s["second"], s["observed"]) for h, s in zip(hospitals, sums)],
    )
    pooled = np.concatenate([h.x_train[:, cols] for h in hospitals])
    clipped = np.clip(pooled, [b[0] for b in bounds], [b[1] for b in bounds])
    assert norm.pooled_count == len(pooled) == 486
    assert np.allclose(norm.mean, clipped.mean(axis=0), rtol=1e-6)
    assert np.allclose(norm.std, np.maximum(clipped.std(axis=0), 1e-3 * np.ptp(bounds, axis=1)), rtol=1e-5)
    x = hospitals[0].prepared(np.concatenate([h.x_train for h in hospitals]), norm.mean, norm.std)
    assert np.abs(x[:, cols].mean(axis=0)).max() < 0.01
    assert np.allclose(x[:, cols].std(axis=0), 1.0, atol=0.01)


def test_a_feature_declared_with_an_honest_wide_range_is_not_squashed():
    """A lab value declared 0.005-600 whose patients sit around 5: scaled by its spread, not the range."""
    rng = np.random.default_rng(1)
    rows = [rng.lognormal(1.5, 0.6, size=(n, 1)) for n in (300, 200, 100)]
    norm = _pooled(rows, [(0.005, 600.0)])
    true = np.concatenate(rows)
    assert abs(norm.mean[0] - true.mean()) < 1e-6
    assert abs(norm.std[0] - true.std()) < 1e-6 and norm.std[0] < 10  # the range's quarter would be 150


def test_missing_values_do_not_pull_the_mean_towards_the_middle_of_the_range():
    rng = np.random.default_rng(2)
    full = rng.normal(5.0, 1.0, size=(400, 1))
    holed = full.copy()
    holed[rng.random(400) < 0.6] = np.nan  # 60 % missing
    norm = _pooled([holed[:200], holed[200:]], [(0.0, 100.0)])
    observed = holed[~np.isnan(holed)]
    assert abs(norm.mean[0] - observed.mean()) < 1e-6  # not 0.4 * 5 + 0.6 * 50 = 32
    assert abs(norm.std[0] - observed.std()) < 1e-6


def test_under_noise_a_spread_the_release_cannot_resolve_gets_a_scale_near_the_range():
    """A few dozen patients at a large noise multiplier: the variance estimate is noise, so the scale
    is floored at the estimate's standard error instead of dividing by a noise-sized number."""
    rows = [np.full((40, 1), 50.0) + np.random.default_rng(s).normal(0, 0.01, (40, 1)) for s in range(3)]
    scales = [_pooled(rows, [(0.0, 100.0)], noise=20.0, seed=s).std[0] for s in range(20)]
    assert min(scales) > 10.0  # not the true 0.01: that would blow the feature up 1,000-fold
    assert max(scales) <= 50.0  # and never more than half the range


def test_the_noisy_release_has_the_calibrated_spread():
    x = np.zeros((50, 2), dtype=np.float32)
    draws = np.array(
        [local_sums(x, [(0.0, 1.0), (0.0, 1.0)], 3.0, np.random.default_rng(s))["sum"][0] for s in range(4000)]
    )
    target = 3.0 * sensitivity(2)
    assert abs(np.std(draws) - target) < 0.08 * target


def test_one_patient_moves_the_release_by_at_most_the_sensitivity():
    _names, cols, bounds = _schema()
    data = load_center(1).x_train[:, cols]
    worst = 0.0
    for candidate in (
        [lo for lo, _ in bounds],
        [hi for _, hi in bounds],
        [np.nan] * len(bounds),
        [hi if i % 2 else lo for i, (lo, hi) in enumerate(bounds)],
    ):
        row = np.array([candidate], dtype=np.float64)
        a = np.concatenate([local_sums(data, bounds, None, None)[k] for k in ("sum", "second", "observed")])
        b = np.concatenate(
            [local_sums(np.concatenate([data, row]), bounds, None, None)[k] for k in ("sum", "second", "observed")]
        )
        worst = max(worst, float(np.linalg.norm(b - a)))
    assert worst <= sensitivity(len(cols)) + 1e-9
    assert worst >= 0.9 * sensitivity(len(cols))  # an extreme patient comes close: the bound is tight


def test_every_patient_contribution_stays_within_the_sensitivity():
    rng = np.random.default_rng(3)
    values = rng.normal(0, 100, size=(500, 6))
    values[rng.random(values.shape) < 0.3] = np.nan
    norms = np.linalg.norm(contributions(values, [(-50.0, 50.0)] * 6), axis=1)
    assert norms.max() <= sensitivity(6) + 1e-12


def test_missing_values_contribute_nothing_and_are_not_counted_as_observed():
    values = np.array([[np.nan, 4.0], [2.0, np.nan]])
    sums = local_sums(values, [(0.0, 4.0), (0.0, 4.0)], None, None)
    assert sums["sum"] == [0.0, 0.5]
    assert sums["observed"] == [0.5, 0.5]  # one observed value each, at weight 1/2


def test_training_inputs_are_clipped_to_the_public_range_like_the_statistics():
    h = load_center(0)
    _names, cols, bounds = _schema()
    x = h.x_train[:3].copy()
    x[0, cols[0]] = 65526.0  # an impossible age
    out = h.prepared(x, [0.0] * len(cols), [1.0] * len(cols))
    assert out[0, cols[0]] == bounds[0][1]
