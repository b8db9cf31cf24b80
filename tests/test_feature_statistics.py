import numpy as np

from client.datasets.fed_heart_disease import load_center
from client.feature_stats import local_sums, normalise, sensitivity
from server.feature_statistics import pooled_normalisation


def test_exact_statistics_round_equals_pooled_mean_and_std():
    hospitals = [load_center(i) for i in range(4)]
    names = hospitals[0].numeric_features
    cols = [hospitals[0].feature_names.index(f) for f in names]
    bounds = [hospitals[0].feature_bounds[f] for f in names]
    rng = np.random.default_rng(0)
    sums = [local_sums(h.x_train, cols, bounds, None, rng) for h in hospitals]
    norm = pooled_normalisation(names, bounds, sums)
    pooled = np.concatenate([h.x_train[:, cols] for h in hospitals])
    clipped = np.clip(pooled, [b[0] for b in bounds], [b[1] for b in bounds])
    assert norm.pooled_count == len(pooled) == 486
    assert np.allclose(norm.mean, clipped.mean(axis=0), rtol=1e-6)
    assert np.allclose(norm.std, clipped.std(axis=0), rtol=1e-6)
    x = normalise(np.concatenate([h.x_train for h in hospitals]), cols, norm.mean, norm.std)
    assert np.allclose(x[:, cols].mean(axis=0), 0.0, atol=0.01)
    assert np.allclose(x[:, cols].std(axis=0), 1.0, atol=0.02)


def test_noisy_release_has_the_calibrated_spread():
    x = np.zeros((50, 2), dtype=np.float32)
    draws = [local_sums(x, [0, 1], [(0.0, 1.0), (0.0, 1.0)], 3.0, np.random.default_rng(s))["count"][0] - 50
             for s in range(2000)]
    assert abs(np.std(draws) - 3.0 * sensitivity(2)) < 0.1 * 3.0 * sensitivity(2)
