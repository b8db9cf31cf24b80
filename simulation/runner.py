"""`fedcare simulate`: N virtual hospitals on Flower's Simulation Engine, in this process.

The ServerApp and ClientApp are the same ones ``flwr run .`` deploys; only the node settings
(ledger folder, budget) are handed in directly because an in-process run has no node config.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.node_policy import NodePolicy
from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings
from fedcare.safe_environment import apply_safe_environment


@dataclass
class SimulationOutcome:
    results: dict[str, Any]
    federation: Any  # server.federation_loop.FederationResult


def parallel_workers(num_hospitals: int, max_workers: int | None = None) -> int:
    """How many ClientApp actors Ray runs: one per CPU, never more than there are hospitals.

    Each actor is a Ray worker process holding torch, Opacus and a model (~0.4 GB measured), and
    Flower starts them all up front, so the cap keeps a 4-hospital run on a 64-core machine
    from holding 60 idle actors. Memory is bounded by this number, not by the hospital count.
    """
    cpus = max(1, os.cpu_count() or 1)
    return max(1, min(cpus, num_hospitals, max_workers or cpus))


def exchange_timeout(num_hospitals: int, workers: int) -> float:
    """The ServerApp's wait per exchange: the deployment wait once per wave of hospitals.

    Deployed hospitals answer in parallel; here ``workers`` actors serve them in
    ceil(hospitals / workers) waves, so a fixed wait would drop the last waves of a large
    simulation (100 hospitals at ~20 s of DP planning each on 2 workers take ~1,000 s).
    """
    from server.federation_loop import EXCHANGE_TIMEOUT

    return EXCHANGE_TIMEOUT * math.ceil(num_hospitals / workers)


def backend_config(num_hospitals: int, max_workers: int | None = None) -> dict[str, Any]:
    """Ray: one CPU per actor, ``parallel_workers`` actors, loopback only, no dashboard, quiet workers."""
    import torch

    workers = parallel_workers(num_hospitals, max_workers)
    gpus = 1.0 / workers if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {
            "num_cpus": workers,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        },
    }


def _node_defaults(
    s: RunSettings, ledger_dir: str | Path, policy: NodePolicy, reproducible_noise: bool
) -> dict[str, Any]:
    """The node config every simulated hospital starts from: its ledgers, its policy, its data."""
    from client.client_app import REPRODUCIBLE_NOISE, SIMULATED_CONSORTIUM

    # the simulated hospitals' identity keys derive from a secret kept with their state, never the ServerApp's
    node_defaults: dict[str, Any] = {
        "ledger-dir": str(ledger_dir),
        **policy.to_node_config(),
        SIMULATED_CONSORTIUM: str(Path(ledger_dir) / "consortium"),
    }
    if s.data_root:
        node_defaults |= {"data-root": s.data_root, "cache-dir": str(Path(s.data_root) / ".fedcare-cache")}
    if reproducible_noise:
        node_defaults[REPRODUCIBLE_NOISE] = s.seed
    return node_defaults


def run(
    s: RunSettings,
    *,
    ledger_dir: str | Path,
    epsilon_budget: float | None = None,
    progress: Callable[[str], None] = print,
    verbose: bool = False,
    max_workers: int | None = None,
    policy: NodePolicy | None = None,
    reproducible_noise: bool = False,
) -> SimulationOutcome:
    """Run one federated simulation; returns the results written to ``s.output_dir``.

    Every simulated hospital applies ``policy`` (default: ``simulated_policy(s, epsilon_budget)``).
    ``reproducible_noise`` keys every hospital's noise from the run seed, for benchmarks: the
    results then say they are not private. ``max_workers`` caps the parallel ClientApp actors
    (default: one per CPU), hence peak memory.
    """
    apply_safe_environment()
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import make_server_app
    from simulation.hospital_policy import simulated_policy

    policy = policy or simulated_policy(s, epsilon_budget)
    node_defaults = _node_defaults(s, ledger_dir, policy, reproducible_noise)
    captured: dict[str, Any] = {}

    def keep(federation: Any, results: dict[str, Any]) -> None:
        captured.update(federation=federation, results=results)

    workers = parallel_workers(s.hospitals, max_workers)
    server_app = make_server_app(
        s, s.hospitals, progress, on_result=keep, timeout=exchange_timeout(s.hospitals, workers)
    )
    client_app = make_client_app(node_defaults)
    if not verbose:
        FLOWER_LOGGER.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=s.hospitals,
            backend_config=backend_config(s.hospitals, workers),
        )
    except FedcareError:
        raise
    except Exception as exc:  # the ServerApp's own error was already reported by progress()
        cause = exc.__cause__ or exc
        if isinstance(cause, FedcareError):
            raise cause from None
        raise FedcareError(f"the simulation failed: {cause}", "rerun with --verbose for Flower's log") from exc
    finally:
        FLOWER_LOGGER.setLevel(logging.INFO)
    if "results" not in captured:
        raise FedcareError("the simulation ended without results", "rerun with --verbose for Flower's log")
    return SimulationOutcome(captured["results"], captured["federation"])
