"""Binary classification metrics a clinician reads, computed from mergeable summaries.

A hospital reports a confusion matrix and score histograms per label (never per-patient scores),
so pooled metrics across hospitals are exact sums; AUC from histograms is exact up to binning.
A segmentation test adds Dice and HD95 sums over its studies (``client/segmentation_scores.py``);
its confusion matrix is then lesion detection per study.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HISTOGRAM_BINS = 200


@dataclass
class BinarySummary:
    """Counts behind every metric: confusion matrix, loss sum and score histograms by label."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    loss_sum: float = 0.0
    pos_hist: np.ndarray | None = None
    neg_hist: np.ndarray | None = None
    dice_sum: float = 0.0  # segmentation: Dice summed over the test studies that hold a lesion
    dice_n: int = 0
    hd95_sum: float = 0.0  # ... 95th-percentile Hausdorff distance (voxels) where both masks mark voxels
    hd95_n: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def __add__(self, other: BinarySummary) -> BinarySummary:
        return BinarySummary(
            self.tp + other.tp,
            self.fp + other.fp,
            self.tn + other.tn,
            self.fn + other.fn,
            self.loss_sum + other.loss_sum,
            _add(self.pos_hist, other.pos_hist),
            _add(self.neg_hist, other.neg_hist),
            self.dice_sum + other.dice_sum,
            self.dice_n + other.dice_n,
            self.hd95_sum + other.hd95_sum,
            self.hd95_n + other.hd95_n,
        )

    def metrics(self) -> dict[str, float]:
        """accuracy, recall (sensitivity), specificity, F1, ROC AUC, loss and n; for a segmentation
        test also dice and hd95 (means over the studies behind them)."""
        n = self.n
        tp, fp, tn, fn = self.tp, self.fp, self.tn, self.fn
        recall = tp / (tp + fn) if tp + fn else float("nan")
        precision = tp / (tp + fp) if tp + fp else float("nan")
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
        return {
            "n": n,
            "accuracy": (tp + tn) / n if n else float("nan"),
            "recall": recall,
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "precision": precision,
            "f1": f1,
            "auc": auc_from_histograms(self.pos_hist, self.neg_hist),
            "loss": self.loss_sum / n if n else float("nan"),
        } | ({"dice": self.dice_sum / self.dice_n, "hd95": _mean(self.hd95_sum, self.hd95_n)} if self.dice_n else {})


def _mean(total: float, count: int) -> float:
    return total / count if count else float("nan")


def _add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None if b is None else b.copy()
    return a.copy() if b is None else a + b


def summarize(probabilities: np.ndarray, labels: np.ndarray, loss_sum: float, threshold: float = 0.5) -> BinarySummary:
    """Summarise one hospital's predictions (probabilities of the positive class)."""
    probs = np.asarray(probabilities, dtype=float)
    y = np.asarray(labels).astype(int)
    pred = probs >= threshold
    bins = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    return BinarySummary(
        tp=int(np.sum(pred & (y == 1))),
        fp=int(np.sum(pred & (y == 0))),
        tn=int(np.sum(~pred & (y == 0))),
        fn=int(np.sum(~pred & (y == 1))),
        loss_sum=float(loss_sum),
        pos_hist=np.histogram(probs[y == 1], bins=bins)[0].astype(np.int64),
        neg_hist=np.histogram(probs[y == 0], bins=bins)[0].astype(np.int64),
    )


def auc_from_histograms(pos: np.ndarray | None, neg: np.ndarray | None) -> float:
    """ROC AUC = P(score_pos > score_neg) + P(tie)/2, with ties meaning the same bin."""
    if pos is None or neg is None or pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    pos = pos.astype(float)
    neg = neg.astype(float)
    neg_below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))
    wins = np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg)
    return float(wins / (pos.sum() * neg.sum()))
