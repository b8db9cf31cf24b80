"""The final table a researcher reads: per hospital, federated vs personalised vs local-only vs
pooled-trained, epsilon spent.

Presentation only: ``build_table`` draws rows that ``simulation.baseline_comparison`` (a local run,
beside its baselines) or ``server_rows`` (a deployed run, from the coordinator's results.json) made.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table
from rich.text import Text


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# the columns of the federated, local-only and other (personalised, pooled-trained) models, by whether
# the run classifies (False) or segments (True)
_METRICS = {
    False: (
        ("accuracy", "recall", "specificity", "f1", "auc"),
        ("accuracy", "recall", "f1", "auc"),
        ("accuracy", "auc"),
    ),
    True: (("dice", "hd95", "auc"), ("dice", "hd95", "auc"), ("dice", "auc")),
}
_LABELS = {
    "accuracy": "acc",
    "recall": "recall",
    "specificity": "spec",
    "f1": "F1",
    "auc": "AUC",
    "dice": "Dice",
    "hd95": "HD95\n(vox)",
}


def build_table(rows: list[dict[str, Any]], pooled: dict[str, Any], dp: bool, local_columns: bool = True) -> Table:
    """``rows``: name, train_n, test_n, fed / local / central (metrics), epsilon. ``local_columns=False``
    leaves out the local-only columns (a deployed run: the coordinator has no hospital's data)."""
    title = (
        "fedcare: federated model vs local-only vs pooled training, per hospital test split"
        if local_columns
        else "fedcare: federated model, per hospital test split"
    )
    table = Table(title=title, show_lines=False)
    table.add_column("hospital", no_wrap=True)
    central = any(r.get("central") for r in rows)
    personal = any(r.get("personalised") for r in rows)
    segmentation = any("dice" in (r.get("fed") or {}) for r in [*rows, pooled])
    fed_metrics, local_metrics, other_metrics = _METRICS[segmentation]
    columns = ["train", "test", *(f"fed\n{_LABELS[m]}" for m in fed_metrics)]
    columns += [f"person-\nalised\n{_LABELS[m]}" for m in other_metrics] if personal else []
    columns += [f"local\n{_LABELS[m]}" for m in local_metrics] if local_columns else []
    columns += [f"pooled-\ntrained\n{_LABELS[m]}" for m in other_metrics] if central else []
    for col in [*columns, "epsilon\nspent"]:
        table.add_column(col, justify="right", no_wrap=True)
    for r in [*rows, pooled]:
        fed, loc, cen = r.get("fed") or {}, r.get("local") or {}, r.get("central") or {}
        own = r.get("personalised") or {}
        eps = r.get("epsilon")
        # a hospital's name is its folder's (user text): a Text cell, never read as rich markup
        cells: list[Any] = [Text(str(r["name"])), str(r.get("train_n", "-")), str(r.get("test_n", "-"))]
        cells += [_f(fed.get(m)) for m in fed_metrics]
        cells += [_f(own.get(m)) for m in other_metrics] if personal else []
        cells += [_f(loc.get(m)) for m in local_metrics] if local_columns else []
        cells += [_f(cen.get(m)) for m in other_metrics] if central else []
        cells.append((_f(eps, 3) if eps is not None else "-") if dp else "no DP")
        table.add_row(*cells, style="bold" if r is pooled else None)
    return table


def server_rows(results: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the final table from what the server knows (a run's results.json), for a deployed run.

    The coordinator holds no hospital's data: "train" is the training size each hospital released
    (with DP: to within one batch), "test" the number of test examples behind its figures; a
    hospital that refused or withheld its evaluation shows "-".
    """
    rows = []
    for name, hospital in sorted(results["hospitals"].items()):
        fed = results["final"].get(name) or {}
        released = hospital.get("released_count")
        rows.append(
            {
                "name": name,
                "train_n": "-" if released is None else round(released),
                "test_n": fed.get("n", "-"),
                "fed": fed,
                "epsilon": hospital.get("epsilon"),
                "personalised": results.get("personalised", {}).get(name),
            }
        )
    counts = [r["train_n"] for r in rows if r["train_n"] != "-"]
    pooled_fed = results["final"].get("pooled") or {}
    pooled = {
        "name": "pooled",
        "train_n": sum(counts) if counts else "-",
        "test_n": pooled_fed.get("n", "-"),
        "fed": pooled_fed,
        "personalised": results.get("personalised", {}).get("pooled"),
        "epsilon": max((r["epsilon"] for r in rows if r["epsilon"] is not None), default=None),
    }
    return rows, pooled
