"""Flower's own SecAgg+ (legacy API) on the same workload as fedcare's secure-aggregation benchmark.

For comparison only: fedcare does not use this path (its ServerApp is Message-API only, and
Flower 1.41's ``SecAggPlusWorkflow`` needs a ``LegacyContext``; see DESIGN.md). Same hospitals
(the breast-cancer ehr-table folders), same MLP, same local training (one epoch of plain SGD,
batch 16, learning rate 0.05), same Simulation Engine and Ray settings, 10 nodes. SecAgg+ runs
with every node sharing with every other (``num_shares`` = nodes, as fedcare's complete mask
graph) and a majority reconstruction threshold (fedcare's default), Flower's default 32-bit
modulus and 22-bit quantisation; fedcare uses a 64-bit ring and 32-bit quantisation.

A round here is the fit phase: from ``configure_fit`` to the end of ``aggregate_fit`` (evaluation
is off, so the legacy workflow runs nothing else between rounds).
"""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np


def _hospital_arrays(folder: Path, train_fraction: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """As many training rows as fedcare trains on (its split keeps 30 % for testing), as float32
    features z-scored locally, and 0/1 labels."""
    import pandas as pd

    frame = pd.read_csv(folder / "table.csv")
    frame = frame.iloc[: round(train_fraction * len(frame))]
    y = frame.pop("target").to_numpy(np.float32)
    x = frame.drop(columns=["patient_id"]).to_numpy(np.float32)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    return x, y


def _client_app(data_root: Path, hidden: int, secure: bool) -> Any:
    import torch
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    from client.dp_trainer import train
    from client.secret_randomness import SecretRandom
    from shared_models.registry import build_model

    class _Hospital(NumPyClient):
        def __init__(self, partition: int) -> None:
            self.x, self.y = _hospital_arrays(data_root / f"hospital-{partition}")
            self.model = build_model("mlp", (self.x.shape[1],), hidden_units=hidden)

        def _set(self, parameters: list[np.ndarray]) -> None:
            state = dict(zip(self.model.state_dict().keys(), (torch.from_numpy(np.asarray(p)) for p in parameters)))
            self.model.load_state_dict(state, strict=True)

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            self._set(parameters)
            train(
                self.model,
                self.x,
                self.y,
                epochs=1,
                batch_size=16,
                lr=0.05,
                weight_decay=0.0,
                dp=None,
                rng=SecretRandom.reproducible(0),
            )
            weights = [v.detach().cpu().numpy() for v in self.model.state_dict().values()]
            return weights, len(self.y), {}

    def client_fn(context: Any) -> Any:
        return _Hospital(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


def _server_app(initial: list[np.ndarray], nodes: int, rounds: int, secure: bool, fit_seconds: list[float]) -> Any:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import ServerApp

    class _Timed(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            self._started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            if failures:
                raise RuntimeError(f"Flower SecAgg+ benchmark: {len(failures)} node(s) failed in round {server_round}")
            out = super().aggregate_fit(server_round, results, failures)
            fit_seconds.append(time.perf_counter() - self._started)
            return out

    strategy = _Timed(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters(initial),
    )
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=nodes, reconstruction_threshold=nodes // 2 + 1) if secure else None
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    return app


def run_once(data_root: Path, hidden: int, nodes: int, rounds: int, secure: bool) -> list[float]:
    """Per-round fit seconds of one Flower simulation (plain FedAvg, or FedAvg under SecAgg+)."""
    import logging

    import torch
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.simulation import run_simulation

    from shared_models.registry import build_model
    from simulation.runner import backend_config

    x, _ = _hospital_arrays(data_root / "hospital-0")
    torch.manual_seed(0)
    initial = [v.numpy() for v in build_model("mlp", (x.shape[1],), hidden_units=hidden).state_dict().values()]
    fit_seconds: list[float] = []
    FLOWER_LOGGER.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            run_simulation(
                server_app=_server_app(initial, nodes, rounds, secure, fit_seconds),
                client_app=_client_app(data_root, hidden, secure),
                num_supernodes=nodes,
                backend_config=backend_config(nodes),
            )
    finally:
        FLOWER_LOGGER.setLevel(logging.INFO)
    if len(fit_seconds) != rounds:
        raise RuntimeError(f"Flower SecAgg+ benchmark: {len(fit_seconds)} of {rounds} rounds completed")
    return fit_seconds
