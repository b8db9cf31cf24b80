"""The final table a researcher reads: per hospital, federated vs local-only, epsilon spent."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from client.datasets import HospitalData
from fedcare.run_config import RunSettings


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def build_table(rows: list[dict[str, Any]], pooled: dict[str, Any], dp: bool) -> Table:
    """``rows``: name, train_n, test_n, fed / local / central (metrics), epsilon."""
    table = Table(title="fedcare: federated model vs local-only vs pooled training, per hospital test split",
                  show_lines=False)
    table.add_column("hospital", no_wrap=True)
    central = any(r.get("central") for r in rows)
    columns = ["train", "test", "fed\nacc", "fed\nrecall", "fed\nspec", "fed\nF1", "fed\nAUC",
               "local\nacc", "local\nrecall", "local\nF1", "local\nAUC"]
    columns += ["pooled-\ntrained\nacc", "pooled-\ntrained\nAUC"] if central else []
    for col in columns + ["epsilon\nspent"]:
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows + [pooled]:
        fed, loc, cen = r.get("fed") or {}, r.get("local") or {}, r.get("central") or {}
        eps = r.get("epsilon")
        cells = [r["name"], str(r.get("train_n", "-")), str(r.get("test_n", "-")),
                 _f(fed.get("accuracy")), _f(fed.get("recall")), _f(fed.get("specificity")), _f(fed.get("f1")),
                 _f(fed.get("auc")), _f(loc.get("accuracy")), _f(loc.get("recall")), _f(loc.get("f1")),
                 _f(loc.get("auc"))]
        cells += [_f(cen.get("accuracy")), _f(cen.get("auc"))] if central else []
        cells.append((_f(eps, 3) if eps is not None else "-") if dp else "no DP")
        table.add_row(*cells, style="bold" if r is pooled else None)
    return table


def compare_with_local(hospitals: list[HospitalData], results: dict[str, Any], s: RunSettings,
                       local_baseline: bool, pooled_baseline: bool = False
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the final table: the federated run's figures beside each hospital's local-only model
    and (``pooled_baseline``) a model trained on all hospitals' rows pooled in one place."""
    from simulation.local_baseline import local_only
    from simulation.pooled_baseline import pooled_training

    central = pooled_training(hospitals, s) if pooled_baseline else {}

    rows, local_summaries = [], []
    for h in hospitals:
        row = {"name": h.name, "train_n": len(h.y_train), "test_n": len(h.y_test),
               "fed": results["final"].get(h.name),
               "epsilon": (results["hospitals"].get(h.name) or {}).get("epsilon")}
        if local_baseline:
            summary = local_only(h, s)
            local_summaries.append(summary)
            row["local"] = summary.metrics()
        if h.name in central:
            row["central"] = central[h.name].metrics()
        rows.append(row)
    pooled = {"name": "pooled", "train_n": sum(r["train_n"] for r in rows), "test_n": sum(r["test_n"] for r in rows),
              "fed": results["final"].get("pooled"),
              "epsilon": max((r["epsilon"] for r in rows if r["epsilon"] is not None), default=None)}
    if local_summaries:
        pooled["local"] = sum(local_summaries[1:], local_summaries[0]).metrics()
    if central:
        pooled["central"] = central["pooled"].metrics()
    return rows, pooled
