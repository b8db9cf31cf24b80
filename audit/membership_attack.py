"""Empirical membership-inference audit (LiRA, Carlini et al. 2022) a hospital runs on its own data.

The accountant's epsilon is an upper bound on what DP-SGD can leak; this measures a lower
bound from an actual attack, so the two can be put side by side: a lower bound above the
accountant's epsilon would mean a bug in the DP training or its accounting.

Method (online LiRA, or offline with ``online=False``):
- each example joins the *target* model's training set independently with probability 1/2;
- ``shadows`` shadow models are trained on random halves chosen so that every example is in
  exactly half of them;
- per example, the logit-scaled confidence phi = log(p_true / (1 - p_true)) of each shadow gives
  an IN and an OUT Gaussian (per-example means; one global variance each, as Carlini et al.
  recommend for few shadows); the score is the likelihood ratio of the target's phi;
- AUC and TPR at 1 % and 0.1 % FPR are read from the ROC over all examples. With n_out
  non-members the smallest measurable FPR is 1/n_out: a TPR at a lower FPR is the TPR at zero
  false positives, and the result says so (``fpr_floor``).

Epsilon lower bound: an (epsilon, delta)-DP mechanism forces TPR <= e^eps FPR + delta and
TNR <= e^eps FNR + delta for any test. The examples are split at random: the threshold (and which
of the two inequalities to test) is chosen on one half; on the other half the Clopper-Pearson
intervals (at ``confidence``, alpha split between TPR and FPR) give TPR_low and FPR_high, and
eps_lb = max(0, log((TPR_low - delta) / FPR_high)) (or log((TNR_low - delta) / FNR_high)).
A zero means the sample supports no positive lower bound; the point estimate is never reported.
Caveat: the trials are examples with independent membership in one training run (one-run
auditing, Steinke, Nasr & Jagielski 2023), which makes the bound an empirical audit figure
rather than a proof for every example.

This module knows only a ``train_fn`` and ``(x, y)``: fedcare's MLP and a hospital's rows are
plugged in by ``simulation.membership_target`` (the audit library stays below the client).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]  # x -> P(y=1) (n,) or class probabilities (n, k)
TrainFn = Callable[[np.ndarray, np.ndarray, int], PredictFn]  # (x, y, seed) -> predict_proba

ROW_HEADER = (
    "dataset",
    "model",
    "DP",
    "shadows",
    "members / non-members",
    "AUC",
    "TPR @ 1% FPR",
    "TPR @ 0.1% FPR",
    "epsilon lower bound",
    "accountant epsilon",
)


@dataclass
class AttackResult:
    """What the audit measured (``to_dict`` for JSON, ``render_rows`` for a table)."""

    dataset: str
    model: str
    dp: bool
    shadows: int
    online: bool
    n_members: int
    n_nonmembers: int
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    fpr_floor: float
    epsilon_lower_bound: float
    confidence: float
    delta: float
    accountant_epsilon: float | None
    bound_detail: dict[str, float] = field(default_factory=dict)
    target_train_accuracy: float = float("nan")
    target_test_accuracy: float = float("nan")
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def render_rows(results: Sequence[AttackResult | Mapping[str, Any]]) -> list[list[str]]:
    """One table row per result, in ``ROW_HEADER`` order."""
    rows = []
    for r in results:
        d = r.to_dict() if isinstance(r, AttackResult) else dict(r)

        def tpr(value: float, fpr: float, floor: float = d["fpr_floor"]) -> str:
            text = f"{100 * value:.1f}%"
            return text + " (at 0 FP)" if floor > fpr else text

        acc = d.get("accountant_epsilon")
        rows.append(
            [
                d["dataset"],
                d["model"],
                "yes" if d["dp"] else "no",
                str(d["shadows"]),
                f"{d['n_members']} / {d['n_nonmembers']}",
                f"{d['auc']:.3f}",
                tpr(d["tpr_at_1pct_fpr"], 0.01),
                tpr(d["tpr_at_01pct_fpr"], 0.001),
                f"{d['epsilon_lower_bound']:.2f} ({100 * d['confidence']:.0f}% conf., delta={d['delta']:g})",
                "inf (no DP)" if acc is None else f"{acc:.2f}",
            ]
        )
    return rows


# ---- the attack ---------------------------------------------------------------------------------
def logit_confidence(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """phi = log p_true - log(1 - p_true), computed in float64 with probabilities kept off 0 and 1."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    p_true = np.where(y == 1, p, 1.0 - p) if p.ndim == 1 else p[np.arange(len(y)), y]
    p_true = np.clip(p_true, 1e-300, 1.0)
    rest = np.clip(1.0 - p_true, 1e-300, 1.0)
    return np.log(p_true) - np.log(rest)


def lira_scores(
    target_phi: np.ndarray, shadow_phi: np.ndarray, shadow_in: np.ndarray, online: bool = True
) -> np.ndarray:
    """Per-example membership scores (higher = more likely a member).

    ``shadow_phi``/``shadow_in``: (shadows, n) confidences and membership masks.
    """
    inn = np.where(shadow_in, shadow_phi, np.nan)
    out = np.where(~shadow_in, shadow_phi, np.nan)
    mu_out = np.nanmean(out, axis=0)
    sd_out = max(float(np.nanstd(out - mu_out)), 1e-6)
    if not online:
        return (target_phi - mu_out) / sd_out
    mu_in = np.nanmean(inn, axis=0)
    sd_in = max(float(np.nanstd(inn - mu_in)), 1e-6)
    log_in = -0.5 * ((target_phi - mu_in) / sd_in) ** 2 - math.log(sd_in)
    log_out = -0.5 * ((target_phi - mu_out) / sd_out) ** 2 - math.log(sd_out)
    return log_in - log_out


def tpr_at_fpr(members: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Highest TPR over thresholds whose empirical FPR is at most ``fpr``."""
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(members, scores)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Two-sided exact binomial interval for k successes in n at level 1 - alpha (one side alpha/2)."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def _bound_at(
    members: np.ndarray, scores: np.ndarray, threshold: float, delta: float, alpha: float
) -> dict[str, float]:
    """Both one-sided epsilon bounds of the test "score >= threshold means member"."""
    guess = scores >= threshold
    pos, neg = int(members.sum()), int((~members).sum())
    tp, fp = int((guess & members).sum()), int((guess & ~members).sum())
    # alpha/2 for the TPR interval, alpha/2 for the FPR one (Bonferroni); each is one-sided.
    tpr_lo, _ = clopper_pearson(tp, pos, alpha)
    _, fpr_hi = clopper_pearson(fp, neg, alpha)
    tnr_lo, fnr_hi = 1.0 - fpr_hi, 1.0 - tpr_lo
    members_side = math.log((tpr_lo - delta) / fpr_hi) if tpr_lo > delta and fpr_hi > 0 else 0.0
    nonmembers_side = math.log((tnr_lo - delta) / fnr_hi) if tnr_lo > delta and fnr_hi > 0 else 0.0
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "members": pos,
        "nonmembers": neg,
        "tpr_low": tpr_lo,
        "fpr_high": fpr_hi,
        "members_side": max(members_side, 0.0),
        "nonmembers_side": max(nonmembers_side, 0.0),
    }


def epsilon_lower_bound(
    members: np.ndarray, scores: np.ndarray, delta: float, confidence: float, rng: np.random.Generator
) -> tuple[float, dict[str, float]]:
    """A Clopper-Pearson epsilon lower bound; threshold and side chosen on a disjoint random half.

    The side: "score >= t -> member" bounds eps by TPR/FPR, its complement by TNR/FNR. Choosing
    both on the calibration half keeps the evaluation half a single pre-registered test.
    """
    members = np.asarray(members, dtype=bool)
    alpha = 1.0 - confidence
    pick = rng.random(len(scores)) < 0.5
    cal_m, cal_s, ev_m, ev_s = members[pick], scores[pick], members[~pick], scores[~pick]
    best, best_t, side = 0.0, float("inf"), "members_side"
    for t in np.unique(cal_s):
        at = _bound_at(cal_m, cal_s, t, delta, alpha)
        for name in ("members_side", "nonmembers_side"):
            if at[name] > best:
                best, best_t, side = at[name], float(t), name
    detail: dict[str, Any] = _bound_at(ev_m, ev_s, best_t, delta, alpha)
    detail |= {"side": side, "calibration_bound": best}
    return float(detail[side]), detail


def _shadow_confidences(
    x: np.ndarray, y: np.ndarray, train_fn: TrainFn, shadow_in: np.ndarray, seed: int
) -> np.ndarray:
    """Each shadow model's logit confidence on every example (one row per shadow)."""
    shadow_phi = np.empty(shadow_in.shape)
    for s in range(len(shadow_in)):
        predict = train_fn(x[shadow_in[s]], y[shadow_in[s]], seed * 7919 + 100 + s)
        shadow_phi[s] = logit_confidence(predict(x), y)
    return shadow_phi


def _auc(members: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(members, scores))


def _lira_note(
    online: bool, shadows: int, n_out: int, floor: float, confidence: float, delta: float, exceeded: bool
) -> str:
    note = (
        f"LiRA ({'online' if online else 'offline'}, {shadows} shadow models). With {n_out} non-members "
        f"the smallest measurable FPR is {floor:.2%}"
        + (": TPR at 0.1% FPR is the TPR at zero false positives. " if floor > 0.001 else ". ")
        + f"The epsilon lower bound holds at {confidence:.0%} confidence (Clopper-Pearson) and delta={delta:g}."
    )
    if exceeded:
        note += " WARNING: the lower bound exceeds the accountant's epsilon: check the DP training and accounting."
    return note


def run_lira(
    x: np.ndarray,
    y: np.ndarray,
    train_fn: TrainFn,
    *,
    shadows: int = 16,
    seed: int = 0,
    online: bool = True,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant_epsilon: Callable[[], float | None] | float | None = None,
    dataset: str = "data",
    model: str = "model",
    dp: bool = False,
) -> AttackResult:
    """Train a target and ``shadows`` shadow models with ``train_fn`` and attack the target.

    ``accountant_epsilon``: the target's epsilon from the accountant (a number, or a callable
    evaluated right after the target is trained -- see ``simulation.membership_target.FedcareMLP.last_epsilon``).
    """
    if shadows < 2 or shadows % 2:
        raise ValueError("shadows must be an even number >= 2 (each example is in exactly half)")
    x, y = np.asarray(x), np.asarray(y)
    n = len(y)
    rng = np.random.default_rng(seed)
    members = rng.random(n) < 0.5
    shadow_in = rng.random((shadows, n)).argsort(axis=0) < shadows // 2
    target = train_fn(x[members], y[members], seed * 7919 + 1)
    acc_eps = accountant_epsilon() if callable(accountant_epsilon) else accountant_epsilon
    target_probs = target(x)
    target_phi = logit_confidence(target_probs, y)
    shadow_phi = _shadow_confidences(x, y, train_fn, shadow_in, seed)
    scores = lira_scores(target_phi, shadow_phi, shadow_in, online)
    auc = _auc(members, scores)
    bound, detail = epsilon_lower_bound(members, scores, delta, confidence, rng)
    predicted = (target_probs >= 0.5).astype(int) if np.ndim(target_probs) == 1 else np.argmax(target_probs, axis=1)
    n_out = int((~members).sum())
    floor = 1.0 / max(n_out, 1)
    note = _lira_note(online, shadows, n_out, floor, confidence, delta, acc_eps is not None and bound > acc_eps)
    return AttackResult(
        dataset=dataset,
        model=model,
        dp=dp,
        shadows=shadows,
        online=online,
        n_members=int(members.sum()),
        n_nonmembers=n_out,
        auc=auc,
        tpr_at_1pct_fpr=tpr_at_fpr(members, scores, 0.01),
        tpr_at_01pct_fpr=tpr_at_fpr(members, scores, 0.001),
        fpr_floor=floor,
        epsilon_lower_bound=bound,
        confidence=confidence,
        delta=delta,
        accountant_epsilon=acc_eps,
        bound_detail=detail,
        target_train_accuracy=float((predicted[members] == y[members]).mean()),
        target_test_accuracy=float((predicted[~members] == y[~members]).mean()),
        note=note,
    )
