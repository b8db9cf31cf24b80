"""What a run leaves behind in its output folder: final model, results.json, a PNG of progress."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.run_config import RunSettings
from server.federation_loop import FederationResult
from shared_models.classification_metrics import BinarySummary
from shared_models.weights import arrays_to_numpy, weights_digest

RESULTS = "results.json"
MODEL = "final_model.npz"
PLOT = "training_curves.png"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_report(out_dir: str | Path, s: RunSettings, result: FederationResult, run_id: str) -> dict[str, Any]:
    """Write model, results.json and plot; return the results dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = arrays_to_numpy(result.arrays)
    np.savez(out / MODEL, **weights)  # type: ignore[arg-type]  # numpy's stub: **arrays is also matched against allow_pickle: bool
    final = result.rounds[-1].evaluation if result.rounds else {}
    results = {
        "run_id": run_id,
        "settings": s.to_config(),
        "model_digest": weights_digest(weights),
        "normalisation": dataclasses.asdict(result.normalisation),
        "hospitals": {
            h.name: {
                "node_id": h.node_id,
                "active": h.active,
                "refusal": h.refusal,
                "epsilon": h.epsilon,
                "delta": h.delta,
                "released_count": h.weight,
                "private_noise": h.private_noise,
            }
            for h in result.hospitals.values()
        },
        # False when any hospital's noise was reproducible: then no epsilon above is a guarantee
        "private": all(h.private_noise for h in result.hospitals.values()),
        # "completed" only when every planned round was trained by enough hospitals
        "status": result.status,
        "rounds_done": result.rounds_done,
        "stopped_early": result.stopped_early,
        "crash_cost": result.crash_cost,
        "rounds": [dataclasses.asdict(r) for r in result.rounds],
        "final": final,
        "personalised": _personalised(result),
    }
    save_results(out, results)
    plot_rounds(results, out / PLOT)
    return results


def _personalised(result: FederationResult) -> dict[str, Any]:
    """Each hospital's personalised model on its test split, and pooled over them (empty: none)."""
    if not result.personalised:
        return {}
    summaries = dict(sorted(result.personalised.items()))
    pooled = sum(summaries.values(), BinarySummary())
    return {name: sm.metrics() for name, sm in summaries.items()} | {"pooled": pooled.metrics()}


def save_results(out_dir: str | Path, results: dict[str, Any]) -> None:
    """(Re)write results.json; non-finite numbers become null (JSON has no NaN)."""
    (Path(out_dir) / RESULTS).write_text(json.dumps(_clean(results), indent=1))


def plot_rounds(results: dict[str, Any], path: Path) -> None:
    """Accuracy (Dice for segmentation) and AUC per hospital and pooled, and epsilon spent, by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = results["rounds"]
    if not rounds:
        return
    xs = [r["round"] for r in rounds]
    names = sorted({n for r in rounds for n in r["evaluation"]} - {"pooled"})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    segmentation = any("dice" in (r["evaluation"].get("pooled") or {}) for r in rounds)
    for metric, ax in zip(("dice" if segmentation else "accuracy", "auc"), axes[:2]):
        for name in [*names, "pooled"]:
            ys = [(r["evaluation"].get(name) or {}).get(metric) for r in rounds]
            ys = [np.nan if y is None else y for y in ys]
            ax.plot(
                xs,
                ys,
                label=name,
                linewidth=2.5 if name == "pooled" else 1.2,
                color="black" if name == "pooled" else None,
            )
        ax.set_title(f"test {metric} per round")
        ax.set_xlabel("round")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[2]
    hospital_names = sorted({n for r in rounds for n in r["epsilon"]})
    for name in hospital_names:
        ys = [r["epsilon"].get(name, np.nan) for r in rounds]
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    target = results["settings"].get("target-epsilon") if results["settings"].get("dp") else None
    if target:
        ax.axhline(target, color="red", linestyle="--", linewidth=1, label="target")
    ax.set_title("epsilon spent (cumulative, accountant)" if hospital_names else "no DP: epsilon not bounded")
    ax.set_xlabel("round")
    ax.set_ylim(bottom=0)
    for a in axes:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if hospital_names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
