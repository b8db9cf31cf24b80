import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score, recall_score, roc_auc_score

from shared_models.classification_metrics import summarize


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=10, max_value=300))
def test_metrics_match_sklearn_and_pool_exactly(seed, n):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
    summary = summarize(p, y, 0.0)
    m = summary.metrics()
    assert m["n"] == n
    assert np.isclose(m["accuracy"], np.mean((p >= 0.5) == y))
    assert np.isclose(m["recall"], recall_score(y, p >= 0.5))
    assert np.isclose(m["f1"], f1_score(y, p >= 0.5, zero_division=np.nan)) or np.isnan(m["f1"])
    # AUC is exact except for positive/negative pairs that share a histogram bin (counted as ties)
    same_bin = float(np.sum(summary.pos_hist * summary.neg_hist)) / (y.sum() * (n - y.sum()))
    assert abs(m["auc"] - roc_auc_score(y, p)) <= 0.5 * same_bin + 1e-12
    half = n // 2
    pooled = summarize(p[:half], y[:half], 0.0) + summarize(p[half:], y[half:], 0.0)
    assert pooled.metrics()["accuracy"] == m["accuracy"]
    assert np.isclose(pooled.metrics()["auc"], m["auc"])


def test_auc_undefined_with_one_class():
    assert np.isnan(summarize(np.array([0.2, 0.9]), np.array([1, 1]), 0.0).metrics()["auc"])
