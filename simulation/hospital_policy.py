"""The policy every simulated hospital applies: the researcher's run, or a hospital.toml's [privacy].

A simulation stands in for hospitals, so by default its hospitals accept what the researcher
runs (DP and secure aggregation as the run asks, a budget of ``--epsilon-budget`` or the run's
epsilon, the run's delta). ``--policy FILE`` instead gives every simulated hospital the
``[privacy]`` section of a hospital.toml, so a researcher sees exactly which runs real hospitals
with that policy would refuse, and why.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from client.node_policy import NODE_CONFIG_KEYS, NodePolicy
from fedcare.errors import FedcareError
from fedcare.protocol import RunRequest
from fedcare.run_config import RunSettings


def simulated_policy(
    s: RunSettings, epsilon_budget: float | None = None, policy_file: Path | None = None
) -> NodePolicy:
    """The policy of every simulated hospital in a run with settings ``s``."""
    if policy_file is not None:
        return policy_from_file(Path(policy_file))
    from server.federation_loop import training_config

    return NodePolicy.accepting(RunRequest.from_config(training_config(s)), epsilon_budget)


def policy_from_file(path: Path) -> NodePolicy:
    """The ``[privacy]`` section of a hospital.toml (its other sections are ignored here)."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise FedcareError(f"cannot read the policy file {path}: {exc.strerror}", "pass a hospital.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedcareError(f"{path} is not valid TOML: {exc}", "fix the line named above") from None
    privacy = doc.get("privacy", {})
    known = set(NODE_CONFIG_KEYS.values()) | {"ledger-dir"}
    unknown = sorted(set(privacy) - known)
    if unknown:
        raise FedcareError(
            f"{path}: [privacy] has unknown key(s) {', '.join(unknown)}", f"keys allowed: {', '.join(sorted(known))}"
        )
    return NodePolicy.from_settings(privacy)


__all__ = ["policy_from_file", "simulated_policy"]
