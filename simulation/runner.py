"""`fedcare simulate`: N virtual hospitals on Flower's Simulation Engine, in this process.

The ServerApp and ClientApp are the same ones ``flwr run .`` deploys; only the node settings
(ledger folder, budget) are handed in directly because an in-process run has no node config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings
from simulation.environment import apply_safe_environment


@dataclass
class SimulationOutcome:
    results: dict[str, Any]
    federation: Any  # server.federation_loop.FederationResult


def backend_config(num_hospitals: int) -> dict[str, Any]:
    """Ray: one CPU per virtual hospital, loopback only, no dashboard, quiet workers."""
    import torch

    cpus = max(1, os.cpu_count() or 1)
    gpus = 1.0 / min(num_hospitals, cpus) if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False,
                      "logging_level": logging.ERROR},
    }


def run(s: RunSettings, *, ledger_dir: str | Path, epsilon_budget: float | None = None,
        progress: Callable[[str], None] = print, verbose: bool = False) -> SimulationOutcome:
    """Run one federated simulation; returns the results written to ``s.output_dir``."""
    apply_safe_environment()
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import make_server_app

    node_defaults: dict[str, Any] = {"ledger-dir": str(ledger_dir)}
    if s.data_root:
        node_defaults |= {"data-root": s.data_root, "cache-dir": str(Path(s.data_root) / ".fedcare-cache")}
    if epsilon_budget is not None:
        node_defaults["epsilon-budget"] = float(epsilon_budget)
    captured: dict[str, Any] = {}

    def keep(federation: Any, results: dict[str, Any]) -> None:
        captured.update(federation=federation, results=results)

    server_app = make_server_app(s, s.hospitals, progress, on_result=keep)
    client_app = make_client_app(node_defaults)
    if not verbose:
        FLOWER_LOGGER.setLevel(logging.ERROR)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=s.hospitals,
                       backend_config=backend_config(s.hospitals))
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
