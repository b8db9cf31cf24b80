import numpy as np

from client.datasets.fed_heart_disease import load_center
from client.feature_stats import local_sums, sensitivity
from server.feature_statistics import PUBLIC_SCALE_FRACTION, pooled_normalisation


def _schema():
    h = load_center(0)
    names = h.numeric_features
    return names, [h.feature_names.index(f) for f in names], [h.feature_bounds[f] for f in names]


def test_exact_statistics_round_centres_on_the_pooled_mean_without_pooling_rows():
    hospitals = [load_center(i) for i in range(4)]
    names, cols, bounds = _schema()
    rng = np.random.default_rng(0)
    sums = [local_sums(h.per_patient_numeric(h.x_train), bounds, None, rng) for h in hospitals]
    assert all(set(s) == {"sum"} for s in sums)  # sums only: never rows, never second moments
    norm = pooled_normalisation(names, bounds, [{"count": len(h.y_train), **s} for h, s in zip(hospitals, sums)])
    pooled = np.concatenate([h.x_train[:, cols] for h in hospitals])
    clipped = np.clip(pooled, [b[0] for b in bounds], [b[1] for b in bounds])
    assert norm.pooled_count == len(pooled) == 486
    assert np.allclose(norm.mean, clipped.mean(axis=0), rtol=1e-6)
    assert np.allclose(norm.std, [PUBLIC_SCALE_FRACTION * (hi - lo) for lo, hi in bounds])
    x = hospitals[0].prepared(np.concatenate([h.x_train for h in hospitals]), norm.mean, norm.std)
    assert np.abs(x[:, cols].mean(axis=0)).max() < 0.01
    assert 0.2 < x[:, cols].std(axis=0).min() and x[:, cols].std(axis=0).max() < 2.0


def test_noisy_release_has_the_calibrated_spread():
    x = np.zeros((50, 2), dtype=np.float32)
    draws = [local_sums(x, [(0.0, 1.0), (0.0, 1.0)], 3.0, np.random.default_rng(s))["sum"][0] + 25
             for s in range(2000)]
    assert abs(np.std(draws) - 3.0 * sensitivity(2)) < 0.1 * 3.0 * sensitivity(2)


def test_one_patient_moves_the_release_by_at_most_the_sensitivity():
    names, cols, bounds = _schema()
    data = load_center(1).x_train
    extreme = np.array([[hi if i % 2 else lo for i, (lo, hi) in enumerate(bounds)]], dtype=np.float32)
    row = np.zeros((1, data.shape[1]), dtype=np.float32)
    row[0, cols] = extreme
    a = local_sums(data[:, cols], bounds, None, np.random.default_rng(0))
    b = local_sums(np.concatenate([data, row])[:, cols], bounds, None, np.random.default_rng(0))
    shift = np.linalg.norm(np.subtract(b["sum"], a["sum"]))
    assert sensitivity(len(cols)) - 1e-6 <= shift <= sensitivity(len(cols)) + 1e-9  # extreme patient: tight


def test_missing_values_contribute_the_middle_of_the_range_and_stay_bounded():
    values = np.array([[np.nan, 4.0], [2.0, np.nan]])
    sums = local_sums(values, [(0.0, 4.0), (0.0, 4.0)], None, np.random.default_rng(0))["sum"]
    assert sums == [0.0, 0.5]
