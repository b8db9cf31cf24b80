"""The final table a researcher reads: per hospital, federated vs local-only, epsilon spent."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def build_table(rows: list[dict[str, Any]], pooled: dict[str, Any], dp: bool) -> Table:
    """``rows``: name, train_n, test_n, fed (metrics), local (metrics), epsilon."""
    table = Table(title="fedcare: federated model vs local-only, per hospital test split", show_lines=False)
    table.add_column("hospital", no_wrap=True)
    for col in ("train", "test", "fed\nacc", "fed\nrecall", "fed\nspec", "fed\nF1", "fed\nAUC",
                "local\nacc", "local\nrecall", "local\nF1", "local\nAUC", "epsilon\nspent"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows + [pooled]:
        fed, loc = r.get("fed") or {}, r.get("local") or {}
        eps = r.get("epsilon")
        table.add_row(
            r["name"], str(r.get("train_n", "-")), str(r.get("test_n", "-")),
            _f(fed.get("accuracy")), _f(fed.get("recall")), _f(fed.get("specificity")), _f(fed.get("f1")),
            _f(fed.get("auc")), _f(loc.get("accuracy")), _f(loc.get("recall")), _f(loc.get("f1")),
            _f(loc.get("auc")), (_f(eps, 3) if eps is not None else "-") if dp else "no DP",
            style="bold" if r is pooled else None,
        )
    return table
