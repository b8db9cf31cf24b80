"""The coordinator's ServerApp: runs the federation and writes the run report."""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings
from server.federation_loop import EXCHANGE_TIMEOUT, FederationResult, run_federation
from server.run_report import write_report


def _log_progress(line: str) -> None:
    log(INFO, "[fedcare] %s", line)


def make_server_app(
    settings: RunSettings | None = None,
    expected_hospitals: int | None = None,
    progress: Callable[[str], None] | None = None,
    on_result: Callable[[FederationResult, dict[str, Any]], None] | None = None,
    timeout: float = EXCHANGE_TIMEOUT,
) -> ServerApp:
    """The ServerApp. In-process simulations pass settings directly (their run config is empty)
    and a ``timeout`` per exchange that allows for their hospitals running in waves."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings or RunSettings.from_config(context.run_config)
        say = progress or _log_progress
        expected = expected_hospitals or s.hospitals
        try:
            result = run_federation(grid, s, expected, say, timeout=timeout, run_id=int(context.run_id))
        except FedcareError as exc:
            say(f"run failed: {exc}")
            raise
        results = write_report(s.output_dir, s, result, str(context.run_id))
        say(f"wrote {s.output_dir}/results.json, final_model.npz, training_curves.png")
        if on_result is not None:
            on_result(result, results)
        elif result.status != "completed":
            # a deployed run that did not do its planned rounds must not end as Flower's finished:completed
            incomplete = FedcareError(
                f"the run is incomplete: {result.stopped_early}",
                f"results.json in {s.output_dir} says which rounds were done and why",
            )
            say(f"run failed: {incomplete.problem}")
            raise incomplete

    return server_app


app = make_server_app()
