"""A hospital's own privacy policy, and the checks that hold every request to it.

The policy comes from the hospital's settings only (``hospital.toml`` ``[privacy]``, passed to the
SuperNode as node config by ``fedcare node start``; in a simulation, the policy the researcher
gives every simulated hospital), never from the coordinator's run config or messages. Every
handler checks the request against it before anything is computed from patient data, and a
request outside it is refused with a reason that names the rule and the request, e.g.
"Hungary refuses: requires DP, the run has dp=false"; the refusal is written to the hospital's
audit log and reported by the coordinator.

Defaults are in ``NodePolicy``'s fields (one place); ``NODE_CONFIG_KEYS`` maps them to the node
config keys ``fedcare/node_settings.py`` writes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fedcare.errors import FedcareError
from fedcare.protocol import RunRequest

EVALUATION_RELEASES = ("per-hospital", "none")


class PolicyRefusal(FedcareError):
    """A request outside the hospital's policy: nothing was computed or released."""


@dataclasses.dataclass(frozen=True)
class NodePolicy:
    """What this hospital accepts. ``epsilon_budget`` is required whenever DP is (no fallback)."""

    epsilon_budget: float | None = None  # lifetime epsilon on this dataset
    max_run_epsilon: float | None = None  # the most one run may spend (None: the budget)
    delta: float = 1e-4  # the delta this hospital accounts at
    require_dp: bool = True
    require_secure_aggregation: bool = True
    min_hospitals: int = 3  # the smallest federation it joins
    min_secagg_threshold: int = 2  # the smallest threshold it accepts (and always t > n/2)
    max_secagg_clip_range: float = 10.0  # the widest per-value range of a masked update
    release_evaluation: str = "per-hospital"  # or "none": no test metrics leave the hospital
    hardened_noise: bool = False  # training noise with the floating-point-attack mitigation (slower)

    def __post_init__(self) -> None:
        for name in ("epsilon_budget", "max_run_epsilon"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise _bad(name, f"{value} is not a positive number", "grant a positive epsilon, e.g. 1.0")
        if not 0 < self.delta < 1:
            raise _bad("delta", f"{self.delta} is not in (0, 1)", "use a delta well below 1/patients, e.g. 1e-5")
        if self.min_hospitals < 2:
            raise _bad("min_hospitals", f"{self.min_hospitals} is below 2", "a federation has at least 2 hospitals")
        if self.min_secagg_threshold < 2:
            raise _bad("min_secagg_threshold", f"{self.min_secagg_threshold} is below 2", "use 2 or more")
        if not (self.max_secagg_clip_range > 0 and math.isfinite(self.max_secagg_clip_range)):
            raise _bad("max_secagg_clip_range", f"{self.max_secagg_clip_range} is not positive", "e.g. 10.0")
        if self.release_evaluation not in EVALUATION_RELEASES:
            raise _bad(
                "release_evaluation",
                f"'{self.release_evaluation}' is not one of {', '.join(EVALUATION_RELEASES)}",
                "choose per-hospital or none",
            )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> NodePolicy:
        """From node config (``NODE_CONFIG_KEYS``); missing keys take the defaults above."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = NODE_CONFIG_KEYS[f.name]
            if key not in settings or settings[key] in (None, ""):
                continue
            raw, kind = settings[key], f.type
            try:
                if "bool" in kind:
                    values[f.name] = _flag(raw)
                elif "int" in kind:
                    values[f.name] = int(raw)
                elif "float" in kind:
                    values[f.name] = float(raw)
                else:
                    values[f.name] = str(raw)
            except (TypeError, ValueError):
                raise _bad(f.name, f"'{raw}' is not a {kind.split()[0]}", "fix the value in hospital.toml") from None
        return cls(**values)

    @classmethod
    def accepting(cls, request: RunRequest, epsilon_budget: float | None = None) -> NodePolicy:
        """The policy of a simulated hospital that accepts the researcher's run as it is (DP and secure
        aggregation as asked, a budget of ``epsilon_budget`` or the run's epsilon, the run's delta).

        Only for hospitals that exist in a simulation: a real hospital's policy is its hospital.toml.
        """
        defaults = cls()
        return cls(
            epsilon_budget=float(epsilon_budget if epsilon_budget is not None else request.target_epsilon),
            delta=request.delta,
            require_dp=request.dp,
            require_secure_aggregation=request.secure_aggregation,
            min_hospitals=max(2, min(defaults.min_hospitals, request.hospitals)),
            max_secagg_clip_range=max(defaults.max_secagg_clip_range, request.secagg_clip_range),
        )

    def to_node_config(self) -> dict[str, Any]:
        """The node-config keys and values (``None`` fields left out)."""
        return {
            NODE_CONFIG_KEYS[f.name]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    # ---- the checks --------------------------------------------------------------------------------
    def run_epsilon_cap(self) -> float:
        """The most one run may spend here; the ledger further caps it by what is left of the budget."""
        return self.max_run_epsilon if self.max_run_epsilon is not None else math.inf

    def check_request(self, hospital: str, request: RunRequest) -> None:
        """Refuse a run this hospital does not join (any stage, before touching data)."""
        problems = []
        if self.require_dp and not request.dp:
            problems.append("requires DP, the run has dp=false")
        if request.dp and self.epsilon_budget is None:
            problems.append("its policy sets no epsilon-budget (hospital.toml [privacy] epsilon-budget)")
        elif request.dp and request.target_epsilon > self.run_epsilon_cap() + 1e-12:  # no cap: the budget caps
            problems.append(
                f"allows at most epsilon {self.run_epsilon_cap():g} per run, "
                f"the run asks target-epsilon={request.target_epsilon:g}"
            )
        if self.require_secure_aggregation and not request.secure_aggregation:
            problems.append("requires secure aggregation, the run has secure-aggregation=false")
        if request.hospitals < self.min_hospitals:
            problems.append(
                f"joins federations of at least {self.min_hospitals} hospitals, "
                f"the run has hospitals={request.hospitals}"
            )
        if request.secure_aggregation and request.secagg_clip_range > self.max_secagg_clip_range:
            problems.append(
                f"accepts a secure-aggregation clip range of at most {self.max_secagg_clip_range:g}, "
                f"the run has secagg-clip-range={request.secagg_clip_range:g}"
            )
        if problems:
            raise refusal(hospital, problems)

    def check_federation(self, hospital: str, n_nodes: int, threshold: int, neighbours: int | None = None) -> None:
        """Refuse a secure-aggregation federation that is too small or a threshold that is too low.

        ``neighbours``: how many peers each hospital shares with (SecAgg+'s sparse graph; None or
        n - 1: everyone). The threshold must be a strict majority of every neighbourhood (itself
        included): then no two groups of honest hospitals can each hand over t shares of one secret.
        The federation's size is checked again once every member's signed keys are in (only members
        on this hospital's roster count).
        """
        hood = n_nodes if neighbours is None else min(n_nodes, neighbours + 1)
        problems = []
        if n_nodes < self.min_hospitals:
            problems.append(
                f"joins federations of at least {self.min_hospitals} hospitals, secure aggregation lists {n_nodes}"
            )
        if threshold < self.min_secagg_threshold:
            problems.append(
                f"accepts a secure-aggregation threshold of at least {self.min_secagg_threshold}, "
                f"the run has t={threshold}"
            )
        if 2 * threshold <= hood:
            what = f"n={n_nodes}" if hood == n_nodes else f"neighbourhoods of {hood}"
            problems.append(f"requires a threshold above half the hospitals, the run has t={threshold} of {what}")
        if problems:
            raise refusal(hospital, problems)

    def check_plain_update(self, hospital: str) -> None:
        """Refuse to send an update in the clear when the policy requires secure aggregation."""
        if self.require_secure_aggregation:
            raise refusal(hospital, ["requires secure aggregation, the train request carries no masking request"])


NODE_CONFIG_KEYS = {
    "epsilon_budget": "epsilon-budget",
    "max_run_epsilon": "max-run-epsilon",
    "delta": "delta",
    "require_dp": "require-dp",
    "require_secure_aggregation": "require-secure-aggregation",
    "min_hospitals": "min-hospitals",
    "min_secagg_threshold": "min-secagg-threshold",
    "max_secagg_clip_range": "max-secagg-clip-range",
    "release_evaluation": "release-evaluation",
    "hardened_noise": "hardened-noise",
}


def refusal(hospital: str, problems: list[str]) -> PolicyRefusal:
    return PolicyRefusal(
        f"{hospital} refuses: {'; '.join(problems)}",
        "the coordinator must change the run, or the hospital its [privacy] policy",
    )


def _bad(name: str, problem: str, hint: str) -> FedcareError:
    return FedcareError(f"hospital policy {NODE_CONFIG_KEYS[name]}: {problem}", hint)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(value)
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)
