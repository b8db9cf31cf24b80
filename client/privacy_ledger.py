"""A hospital's on-disk privacy ledger: what it released, and the epsilon that cost.

Keyed by the hospital's dataset identity (``dataset-id`` in hospital.toml), not by a digest of
the data: adding a patient to a table must not start a fresh budget for every patient already in
it. Each release records the data fingerprint it was computed on. The ledger stores the Opacus
accountant history (noise multiplier, sample rate, steps), delta and the budget; epsilon is always
recomputed by the accountant from that history, so a ledger reloaded between rounds gives exactly
what one long-lived accountant would. A run's noise is planned once; when the rounds left no
longer fit that plan's target (a round paid twice after a coordinator crash), the hospital
re-plans them from this ledger alone (``plan_for_round``) and records the re-plan. Every write is atomic (temp file + rename) under a file
lock: a ClientApp process may be fresh per message. ``client/ledger_guard.py`` checks it against
the hospital's signed audit chain before every release, so a deleted, rolled-back or hand-edited
ledger is refused rather than trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants.analysis import rdp as privacy_analysis

from fedcare.atomic_files import replace_file
from fedcare.dp_accounting import ALPHAS, Entry, RdpComposition, epsilon_of, rdp_of, rdp_per_step
from fedcare.errors import BudgetExhausted, FedcareError

LEDGER_VERSION = 2
MAX_NOISE_MULTIPLIER = 1e4
_EPS_TOLERANCE = 1e-9
# How far a run's remaining rounds may sit above its target before the hospital re-plans them: the
# calibration's own tolerance plus the rounding of summing the same RDP in another order.
_PLAN_TOLERANCE = 1e-8


def calibrate_noise(prefix: list[Entry], release: tuple[float, int], delta: float, target: float) -> float:
    """Smallest noise multiplier for ``release=(sample rate, steps)`` after ``prefix`` stays <= target.

    Like ``opacus.accountants.utils.get_noise_multiplier`` but composed with what was already
    spent, so the plan accounts for earlier rounds, runs and the statistics release. The search
    evaluates a subset of the RDP orders (every 6th while bracketing, then the ones next to the
    best order while bisecting). A subset can only overstate epsilon, so the answer stays within
    the target under all orders; the bisection is repeated around a new centre until the best
    order over all of them lies inside the window, so the answer is also the smallest noise.
    That keeps a plan to a fraction of a second, where all 166 orders took seconds per hospital.
    """
    q, steps = release
    if epsilon_of(prefix, delta) >= target:
        raise ValueError("nothing left to spend")
    spent = rdp_of(prefix)
    everything = list(range(len(ALPHAS)))
    hi = 1.0
    while (found := _epsilon_with(spent, q, steps, hi, delta, everything[::6]))[0] > target:
        hi *= 2
        if hi > MAX_NOISE_MULTIPLIER:
            raise ValueError("budget too small")
    centre = ALPHAS.index(found[1])
    for _ in range(4):
        window = everything[max(0, centre - _ORDER_WINDOW) : centre + _ORDER_WINDOW + 1]
        lo = 0.0
        for _ in range(80):
            mid = (lo + hi) / 2
            if _epsilon_with(spent, q, steps, mid, delta, window)[0] > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-6 * hi:
                break
        eps, best = _epsilon_with(spent, q, steps, hi, delta, everything)
        if eps > target + _EPS_TOLERANCE:
            raise RuntimeError("noise calibration overshot the target epsilon")  # impossible: see above
        centre = ALPHAS.index(best)
        if window[0] < centre < window[-1] or centre in (0, len(ALPHAS) - 1):
            break
    return hi


_ORDER_WINDOW = 8  # orders either side of the best one that the bisection evaluates


def _epsilon_with(
    spent: np.ndarray, q: float, steps: int, sigma: float, delta: float, orders: list[int]
) -> tuple[float, float]:
    """(epsilon, best order) of ``spent`` plus ``steps`` releases at ``sigma``, over some orders."""
    chosen = [ALPHAS[i] for i in orders]
    if len(chosen) == len(ALPHAS):
        rdp = spent + rdp_per_step(float(q), float(sigma)) * int(steps)
    else:
        rdp = spent[orders] + privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=chosen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the smallest alpha" at a subset's edge
        eps, best = privacy_analysis.get_privacy_spent(orders=chosen, rdp=rdp, delta=delta)
    return float(eps), float(best)


def _stats_noise(
    prefix: list[Entry], release: tuple[float, int], delta: float, target: float, fraction: float
) -> float:
    """Noise multiplier for the statistics release so it takes ``fraction`` of the run's RDP.

    Splitting epsilon linearly would waste most of the budget (every (epsilon, delta) conversion
    pays log(1/delta) again); splitting Renyi divergence at the order that is optimal for the
    planned training is how the two releases actually compose.
    """
    q, steps = release
    sigma0 = calibrate_noise(prefix, release, delta, target)
    _, alpha = RdpComposition([*prefix, (sigma0, q, steps)]).epsilon_and_order(delta)
    rdp_train = float(privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma0, steps=steps, orders=[alpha])[0])
    # A Gaussian release with sensitivity 1 has RDP alpha / (2 sigma^2).
    return math.sqrt(alpha * (1 - fraction) / (2 * fraction * rdp_train))


@dataclass(frozen=True)
class RunPlan:
    """Noise calibrated once for a whole run against the hospital's remaining budget."""

    run_id: str
    rounds: int
    steps_per_round: int
    sample_rate: float
    noise_multiplier: float
    stats_noise_multiplier: float | None
    target_epsilon: float


@dataclass(frozen=True)
class Replan:
    """The noise of a run's remaining rounds, re-calibrated at the hospital after its spending left the plan.

    A coordinator that crashes after the hospitals trained a round, but before it aggregated and
    checkpointed it, asks for that round again when it resumes: the round is then paid twice, and
    the planned noise no longer fits the run's target. The hospital re-plans the rounds left from
    its own ledger (what was spent) and its own plan (target, rounds, steps): nothing here comes
    from the coordinator but the round number it asks for.
    """

    from_round: int  # the first round trained at the new noise
    noise_multiplier: float  # the remaining rounds' noise
    previous_noise_multiplier: float
    lost_rounds: tuple[int, ...]  # rounds charged under this plan and asked for again (their update was lost)


class PrivacyLedger:
    """One hospital's privacy ledger (one JSON file per dataset identity)."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self._data = data

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, ledger_dir: str | Path, hospital: str, dataset_id: str, budget: float, delta: float) -> PrivacyLedger:
        """Open (or create) the ledger of this dataset; the hospital's budget may change, delta may not.

        Whether a budget change is allowed is ``client/ledger_guard.py``'s decision (a raise needs a
        signed record); here every change is only recorded.
        """
        directory = Path(ledger_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedcareError(
                f"cannot create the privacy-ledger folder {directory}: {exc.strerror}",
                "set ledger-dir to a writable path",
            ) from None
        path = ledger_path(directory, dataset_id)
        with _locked(path):
            if path.exists():
                data = _read(path)
                if data.get("dataset_id") != dataset_id:
                    raise FedcareError(
                        f"privacy ledger {path} belongs to dataset {data.get('dataset_id')!r}",
                        "move it away; never delete a ledger that recorded releases",
                    )
                if not math.isclose(data["delta"], delta, rel_tol=1e-12):
                    raise FedcareError(
                        f"{hospital}: the privacy ledger uses delta={data['delta']:g}, this run asks delta={delta:g}",
                        "keep delta fixed for a dataset; its epsilon is only comparable at one delta",
                    )
                if not math.isclose(data["budget"], budget):
                    data["budget_changes"].append({"time": time.time(), "from": data["budget"], "to": budget})
                    data["budget"] = budget
                    _write(path, data)
            else:
                data = {
                    "version": LEDGER_VERSION,
                    "hospital": hospital,
                    "dataset_id": dataset_id,
                    "accountant": "rdp",
                    "delta": delta,
                    "budget": budget,
                    "budget_changes": [],
                    "history": [],
                    "releases": [],
                    "plans": {},
                    "feature_stats": None,
                }
                _write(path, data)
        return cls(path, data)

    @staticmethod
    def peek(ledger_dir: str | Path, dataset_id: str) -> dict[str, Any] | None:
        """The ledger file of ``dataset_id`` as stored (None if there is none), without opening it."""
        path = ledger_path(Path(ledger_dir), dataset_id)
        if not path.exists():
            return None
        with _locked(path):
            return _read(path)

    # ---- reading -------------------------------------------------------------------------
    @property
    def hospital(self) -> str:
        return self._data["hospital"]

    @property
    def budget(self) -> float:
        return float(self._data["budget"])

    @property
    def delta(self) -> float:
        return float(self._data["delta"])

    @property
    def history(self) -> list[Entry]:
        return [(float(s), float(q), int(k)) for s, q, k in self._data["history"]]

    @property
    def releases(self) -> list[dict[str, Any]]:
        return list(self._data["releases"])

    def epsilon(self) -> float:
        """Epsilon spent so far, over every recorded release."""
        return epsilon_of(self.history, self.delta)

    @property
    def dataset_id(self) -> str:
        return self._data["dataset_id"]

    def charged_releases(self) -> int:
        """How many releases cost privacy (at least one accounted step)."""
        return self.charged_in(self._data)

    @staticmethod
    def charged_in(stored: dict[str, Any]) -> int:
        """``charged_releases`` of a ledger as stored (``peek``), without opening it."""
        return sum(1 for r in stored.get("releases", []) if sum(int(k) for _, _, k in r["entries"]) > 0)

    def last_release(self) -> dict[str, Any] | None:
        training = [r for r in self._data["releases"] if r["kind"] == "train"]
        return training[-1] if training else None

    def plan(self, run_id: str) -> RunPlan | None:
        raw = self._data["plans"].get(run_id)
        return RunPlan(**raw) if raw else None

    def replans(self, run_id: str) -> list[Replan]:
        """The re-plans of run ``run_id``'s noise, oldest first (none unless its spending left the plan)."""
        return [
            Replan(r["from_round"], r["noise_multiplier"], r["previous_noise_multiplier"], tuple(r["lost_rounds"]))
            for r in self._data.get("replans", {}).get(run_id, [])
        ]

    def charged_rounds(self, run_id: str) -> list[int]:
        """Training rounds charged under run ``run_id``'s plan (a resumed run's releases included)."""
        return [
            int(r["round"])
            for r in self._data["releases"]
            if r["kind"] == "train"
            and r.get("plan_run_id", r["run_id"]) == run_id
            and sum(int(k) for _, _, k in r["entries"]) > 0
        ]

    def feature_stats(self, key: str) -> dict[str, Any] | None:
        """A statistics release already paid for (re-sending it costs nothing: post-processing)."""
        cached = self._data.get("feature_stats")
        return cached["values"] if cached and cached["key"] == key else None

    def exhausted_message(self) -> str:
        last = self.last_release()
        where = f"after round {last['round']} of run {last['run_id']}" if last else "before any round"
        return f"{self.hospital}: budget {self.budget:.2f} exhausted {where} (spent {self.epsilon():.3f})"

    # ---- planning and checking -----------------------------------------------------------
    def plan_run(
        self,
        run_id: str,
        rounds: int,
        steps_per_round: int,
        sample_rate: float,
        run_epsilon: float,
        stats_fraction: float | None,
    ) -> RunPlan:
        """Calibrate the noise once for the whole run (and the statistics release, if needed).

        The run may spend ``run_epsilon`` on top of what was spent before, capped by the budget.
        Repeated calls for the same run return the stored plan.
        """
        existing = self.plan(run_id)
        if existing is not None:
            return existing
        spent = self.epsilon()
        target = min(spent + run_epsilon, self.budget)
        if target - spent <= 1e-6:
            raise BudgetExhausted(
                self.exhausted_message(), "raise this hospital's epsilon budget or stop training on this data"
            )
        prefix = self.history
        stats_sigma = None
        try:
            if stats_fraction is not None:
                stats_sigma = _stats_noise(
                    prefix, (sample_rate, rounds * steps_per_round), self.delta, target, stats_fraction
                )
                prefix = [*prefix, (stats_sigma, 1.0, 1)]
            sigma = calibrate_noise(prefix, (sample_rate, rounds * steps_per_round), self.delta, target)
        except ValueError:
            raise BudgetExhausted(
                f"{self.hospital}: remaining budget {target - spent:.3g} cannot pay for {rounds} rounds "
                f"(noise multiplier would exceed {MAX_NOISE_MULTIPLIER:g})",
                "plan fewer rounds or raise this hospital's epsilon budget",
            ) from None
        plan = RunPlan(run_id, rounds, steps_per_round, sample_rate, sigma, stats_sigma, target)
        with self._updating() as data:
            data["plans"][run_id] = plan.__dict__
        return plan

    def plan_for_round(self, run_id: str, round_: int) -> tuple[RunPlan, Replan | None]:
        """The plan to train round ``round_`` of run ``run_id`` with, and its re-plan if one applies.

        The rounds left (this one to the plan's last) at the current noise must fit the plan's
        target on top of what the ledger says was spent. They do in a run that went as planned;
        when they do not (a round paid twice after a coordinator crash), the noise of the rounds
        left is calibrated again against the plan's target and recorded, so a resumed run finishes
        its planned rounds within the target. Raises ``BudgetExhausted`` when nothing fits.
        """
        plan = self.plan(run_id)
        if plan is None:
            raise ValueError(f"run {run_id} has no privacy plan")
        replans = [r for r in self.replans(run_id) if r.from_round <= round_]
        current = replans[-1] if replans else None
        sigma = current.noise_multiplier if current else plan.noise_multiplier
        left = (plan.sample_rate, plan.steps_per_round * max(1, plan.rounds - round_ + 1))
        if epsilon_of([*self.history, (sigma, *left)], self.delta) <= plan.target_epsilon + _PLAN_TOLERANCE:
            return dataclasses.replace(plan, noise_multiplier=sigma), current
        try:
            new_sigma = calibrate_noise(self.history, left, self.delta, plan.target_epsilon)
        except ValueError:
            raise BudgetExhausted(
                f"{self.hospital}: the rounds left of run {run_id} (from round {round_}) no longer fit its "
                f"target epsilon {plan.target_epsilon:.3g} (spent {self.epsilon():.3f})",
                "raise this hospital's epsilon budget or stop training on this data",
            ) from None
        lost = tuple(r for r in self.charged_rounds(run_id) if r >= round_)
        replan = Replan(round_, new_sigma, sigma, lost)
        with self._updating() as data:
            data.setdefault("replans", {}).setdefault(run_id, []).append(dataclasses.asdict(replan))
        return dataclasses.replace(plan, noise_multiplier=new_sigma), replan

    def check_release(self, entries: list[Entry]) -> float:
        """Epsilon after releasing ``entries``; raises BudgetExhausted if that exceeds the budget."""
        after = epsilon_of(self.history + entries, self.delta)
        if after > self.budget + _EPS_TOLERANCE:
            raise BudgetExhausted(
                self.exhausted_message(), "raise this hospital's epsilon budget or stop training on this data"
            )
        return after

    # ---- recording -----------------------------------------------------------------------
    def record(self, run_id: str, round_: int, kind: str, entries: list[Entry], **extra: Any) -> float:
        """Append what was actually released and return the cumulative epsilon after it."""
        with self._updating() as data:
            history = [tuple(e) for e in data["history"]]
            for sigma, q, steps in entries:
                if steps <= 0:
                    continue
                if history and history[-1][0] == sigma and history[-1][1] == q:
                    s, qq, k = history.pop()
                    history.append((s, qq, k + steps))
                else:
                    history.append((sigma, q, steps))
            data["history"] = [list(e) for e in history]
            eps = epsilon_of([(float(s), float(q), int(k)) for s, q, k in history], data["delta"])
            data["releases"].append(
                {
                    "run_id": run_id,
                    "round": round_,
                    "kind": kind,
                    "time": time.time(),
                    "entries": [list(e) for e in entries],
                    "epsilon_after": eps,
                    **extra,
                }
            )
            if kind == "feature-stats":
                data["feature_stats"] = {"key": extra["stats_key"], "values": extra["values"]}
        return eps

    @contextlib.contextmanager
    def _updating(self) -> Iterator[dict[str, Any]]:
        with _locked(self.path):
            data = _read(self.path)
            yield data
            _write(self.path, data)
            self._data = data


def ledger_path(directory: Path, dataset_id: str) -> Path:
    """One file per dataset identity: a readable slug plus a digest (distinct ids never share a file)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset_id).strip("-.")[:40] or "dataset"
    digest = hashlib.sha256(dataset_id.encode("utf-8")).hexdigest()[:12]
    return directory / f"privacy-ledger-{slug}-{digest}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.with_suffix(".lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedcareError(
            f"privacy ledger {path} is unreadable ({exc})", "restore it from backup; training stays refused until then"
        ) from None
    if data.get("version") != LEDGER_VERSION:
        raise FedcareError(f"privacy ledger {path} has unknown version {data.get('version')}")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    replace_file(path, json.dumps(data, indent=1))
