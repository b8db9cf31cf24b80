"""The defaults sweep's summary: which hospitals it counts below local-only, and where a setting holds."""

from __future__ import annotations

import pytest

from bench.bench_defaults_sweep import _holds, _row


def _run(fed: float, local: float, pooled_fed: float) -> dict:
    def hospital(name: str, test_n: int) -> dict:
        return {"name": name, "site": name, "test_n": test_n, "fed": fed, "personalised": fed - 0.01, "local": local}

    pooled = {"fed": pooled_fed, "central": 0.7, "fed_accuracy": 0.8}
    return {"hospitals": [hospital("big", 300), hospital("few-positives", 100)], "pooled": pooled}


def test_a_row_counts_only_comparable_hospitals_below_local_only():
    row, pooled, below = _row("t", "defaults", [_run(0.70, 0.80, 0.75), _run(0.72, 0.80, 0.77)], positives=[40, 6])
    assert pooled == pytest.approx(0.76) and below == 1
    assert row.endswith("| 1 of 1: big |")
    assert "| 0.710 / 0.700 / 0.800 |" in row


def test_the_heart_data_compares_every_hospital():
    row, _, _ = _row("heart", "defaults", [_run(0.85, 0.80, 0.87)], positives=None)
    assert row.endswith("| 0 of 2 |")


def test_a_setting_holds_where_it_is_within_the_margin_of_the_best():
    pooled = {"defaults": {"a": 0.80, "b": 0.60}, "weight decay 0.05": {"a": 0.795, "b": 0.45}}
    lines = _holds(pooled, {"defaults": 0, "weight decay 0.05": 3})
    assert (
        lines[0]
        == "- defaults: best or within 0.01 of the best pooled federated AUC on 2 of 2; hospitals below local-only: 0"
    )
    assert lines[1].endswith("on 1 of 2; below on b (-0.150); hospitals below local-only: 3")
