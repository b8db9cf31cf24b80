"""Rows of the final table for a local run: the federated run's figures beside each hospital's
local-only model and a pooled-trained one (``fedcare.results_table.build_table`` draws them)."""

from __future__ import annotations

from typing import Any

from client.datasets import HospitalData
from fedcare.run_config import RunSettings


def compare_with_local(
    hospitals: list[HospitalData],
    results: dict[str, Any],
    s: RunSettings,
    local_baseline: bool,
    pooled_baseline: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the final table: the federated run's figures beside each hospital's local-only model
    and (``pooled_baseline``) a model trained on all hospitals' rows pooled in one place."""
    from simulation.local_baseline import local_only
    from simulation.pooled_baseline import pooled_training

    central = pooled_training(hospitals, s) if pooled_baseline else {}

    rows, local_summaries = [], []
    for h in hospitals:
        row = {
            "name": h.name,
            "train_n": len(h.y_train),
            "test_n": len(h.y_test),
            "fed": results["final"].get(h.name),
            "personalised": results.get("personalised", {}).get(h.name),
            "epsilon": (results["hospitals"].get(h.name) or {}).get("epsilon"),
        }
        if local_baseline:
            summary = local_only(h, s)
            local_summaries.append(summary)
            row["local"] = summary.metrics()
        if h.name in central:
            row["central"] = central[h.name].metrics()
        rows.append(row)
    pooled = {
        "name": "pooled",
        "train_n": sum(r["train_n"] for r in rows),
        "test_n": sum(r["test_n"] for r in rows),
        "fed": results["final"].get("pooled"),
        "personalised": results.get("personalised", {}).get("pooled"),
        "epsilon": max((r["epsilon"] for r in rows if r["epsilon"] is not None), default=None),
    }
    if local_summaries:
        pooled["local"] = sum(local_summaries[1:], local_summaries[0]).metrics()
    if central:
        pooled["central"] = central["pooled"].metrics()
    return rows, pooled
