"""`fedcare run DEPLOY_DIR`: the coordinator launches (or resumes) a run on its deployed SuperLink and follows it.

It uses the deployment `fedcare deploy init` wrote (the `flwr` connection under DEPLOY_DIR/flwr-home),
submits the app with a checked run config whose output directory is absolute (the ServerApp writes
there whatever directory the SuperLink was started in), prints the same per-round progress lines
as `fedcare simulate`, then reads the run's real status from `flwr ls` (`flwr run --stream` exits 0
on failure) and the run's results.json, and prints the same final table, less the local-only
columns: a coordinator holds no hospital's data.

Exit codes (fedcare.error_output): 0 the run finished every round; 1 it failed, was stopped, or
hospitals refused so that it stopped early (the reason is printed); 2 a usage error, before any run
is submitted (no deployment there, an unknown run-config key, nothing to resume...).
"""

from __future__ import annotations

import json
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from fedcare.error_output import fail, usage_error
from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings

if TYPE_CHECKING:
    from fedcare.flower_cli import FlowerCli, RunStatus

PROGRESS_MARK = "[fedcare] "  # the ServerApp logs each progress line behind this (server/server_app.py)
FAILED_MARK = "run failed: "  # ... and the reason a run failed


@dataclass(frozen=True)
class CoordinatorDeployment:
    """What `fedcare run` needs from a folder `fedcare deploy init` wrote."""

    folder: Path
    flwr_home: Path
    connection: str
    hospitals: int  # hospital folders (those holding a node key's public half)

    @classmethod
    def load(cls, folder: Path) -> CoordinatorDeployment:
        """Read DEPLOY_DIR/flwr-home/config.toml (its default connection) and count the hospital folders."""
        folder = folder.expanduser().resolve()
        config = folder / "flwr-home" / "config.toml"
        if not config.is_file():
            raise FedcareError(
                f"{folder} is not a deployment folder: {config} is missing",
                "pass the folder `fedcare deploy init` wrote (it holds ca/, superlink/, flwr-home/)",
            )
        try:
            connection = tomllib.loads(config.read_text())["superlink"]["default"]
        except (tomllib.TOMLDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise FedcareError(
                f"{config} names no default SuperLink connection ([superlink] default = ...)",
                "write the deployment again with `fedcare deploy init`",
            ) from None
        return cls(folder, folder / "flwr-home", str(connection), len(list(folder.glob("*/node.pub"))))


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160)


def run(
    deploy_dir: Path = typer.Argument(
        ...,
        help="the folder `fedcare deploy init` wrote (its flwr-home/ connects "
        "to the SuperLink's control listener on this machine)",
    ),
    output_dir: Path = typer.Option(
        Path("runs/deployment"),
        "--output-dir",
        help="where the model, results.json, plots and checkpoints go (sent as an "
        "absolute path: the SuperLink's working directory does not matter)",
    ),
    rounds: int | None = typer.Option(None, "--rounds", help=f"federated rounds [{RunSettings.num_rounds}]"),
    hospitals: int | None = typer.Option(
        None,
        "--hospitals",
        help="how many hospital nodes the run waits for (default: one per hospital folder of the deployment)",
    ),
    min_hospitals: int | None = typer.Option(
        None, "--min-hospitals", help=f"stop when fewer can still train [{RunSettings.min_hospitals}]"
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="continue the run checkpointed in OUTPUT_DIR after its "
        "last completed round, with the run config it was started with",
    ),
    run_config: list[str] | None = typer.Option(
        None,
        "--run-config",
        help="more run-config pairs, as for `flwr run` (e.g. \"strategy='fedadam' target-epsilon=1.0\"; repeatable)",
    ),
    app_dir: Path = typer.Option(Path("."), "--app", help="the Flower app to submit (the fedcare project folder)"),
    verbose: bool = typer.Option(False, "--verbose", help="show the ServerApp's whole log, not only progress lines"),
) -> None:
    """Launch (or --resume) a run on the deployed SuperLink, stream its progress, print the final table."""
    console = _console()
    out = output_dir.expanduser().resolve()
    app = app_dir.expanduser().resolve()
    options = {"num-rounds": rounds, "hospitals": hospitals, "min-hospitals": min_hospitals}
    deployment, config = _checked_launch(deploy_dir, app, out, resume, run_config, options)
    flwr, run_id = _submit(deployment, app, out, config)
    console.print(
        f"{'resumed' if resume else 'started'} run {run_id} on the '{deployment.connection}' SuperLink "
        f"({config['hospitals']} hospitals, {config.get('num-rounds', 'default')} rounds); results go to "
        f"{out}",
        highlight=False,
        markup=False,
    )
    lines: list[str] = []
    status = _follow_until_finished(flwr, run_id, lines, console, verbose, deployment)
    _report_outcome(console, out, run_id, status, lines, deployment)


def _checked_launch(
    deploy_dir: Path, app: Path, out: Path, resume: bool, run_config: list[str] | None, options: dict[str, int | None]
) -> tuple[CoordinatorDeployment, dict[str, Any]]:
    """The deployment and the checked run config; any problem ends the command as a usage error, before submitting."""
    from fedcare.coordinator_run_config import coordinator_run_config, parse_pairs

    try:
        deployment = CoordinatorDeployment.load(deploy_dir)
        if not (app / "pyproject.toml").is_file():
            raise FedcareError(
                f"{app} is not a Flower app folder (no pyproject.toml)",
                "run from the fedcare project folder, or pass --app PATH",
            )
        _check_resume(out, resume)
        if options["hospitals"] is None and deployment.hospitals == 0 and not resume:
            raise FedcareError(
                f"{deployment.folder} holds no hospital folder (<name>/node.pub)",
                "pass --hospitals N: how many hospital nodes the run waits for",
            )
        config = coordinator_run_config(out, deployment.hospitals, resume, parse_pairs(run_config or []), options)
    except FedcareError as exc:
        usage_error(exc.problem, exc.hint)
    return deployment, config


def _submit(deployment: CoordinatorDeployment, app: Path, out: Path, config: dict[str, Any]) -> tuple[FlowerCli, int]:
    """Write the run config into ``out`` and submit the app to the SuperLink; the Flower CLI and the run id."""
    from fedcare.coordinator_run_config import write_run_config
    from fedcare.flower_cli import FlowerCli

    flwr = FlowerCli(deployment.flwr_home, deployment.connection)
    try:
        config_file = write_run_config(out, config)
        run_id = flwr.start_run(app, config_file)
    except FedcareError as exc:
        fail(exc)
    return flwr, run_id


def _follow_until_finished(
    flwr: FlowerCli, run_id: int, lines: list[str], console: Console, verbose: bool, deployment: CoordinatorDeployment
) -> RunStatus:
    """Follow the run to its end; Ctrl-C stops following (exit 130) and says how to follow or stop it again."""
    try:
        return _follow(flwr, run_id, lines, console, verbose)
    except KeyboardInterrupt:
        console.print(
            f"stopped following run {run_id}; it goes on at the SuperLink. Follow it again with "
            f"`FLWR_HOME={deployment.flwr_home} flwr log {run_id} {deployment.connection}`, stop it with "
            f"`flwr stop {run_id} {deployment.connection}`",
            highlight=False,
            markup=False,
        )
        raise typer.Exit(130) from None
    except FedcareError as exc:
        fail(exc)


def _report_outcome(
    console: Console, out: Path, run_id: int, status: RunStatus, lines: list[str], deployment: CoordinatorDeployment
) -> None:
    """Print the run's report when it wrote one; exit 1 unless it completed every round."""
    log_hint = (
        f"the ServerApp's whole log: `FLWR_HOME={deployment.flwr_home} flwr log {run_id} "
        f"{deployment.connection} --show`"
    )
    results = _this_runs_results(out, run_id)
    if results:
        _print_report(console, out, results)
    if not status.completed:
        fail(FedcareError(f"run {run_id} {_why_not_completed(status, lines)}", log_hint))
    if not results:
        fail(
            FedcareError(
                f"run {run_id} completed but {out} holds no report of it",
                "the ServerApp writes it on the SuperLink's machine: run `fedcare run` there; " + log_hint,
            )
        )
    if results.get("stopped_early") or results.get("status", "completed") != "completed":
        fail(
            FedcareError(
                f"run {run_id} stopped early: {results.get('stopped_early')}",
                "see each hospital's reason above; fix what they refuse, then start again "
                "(or --resume once enough hospitals can train)",
            )
        )


def _check_resume(out: Path, resume: bool) -> None:
    from server.checkpoint import CHECKPOINT_DIR

    checkpointed = (out / CHECKPOINT_DIR).is_dir()
    if resume and not checkpointed:
        raise FedcareError(
            f"no checkpoint to resume in {out / CHECKPOINT_DIR}",
            "pass the --output-dir of the run that stopped, or start a new run without --resume",
        )
    if not resume and checkpointed:
        raise FedcareError(
            f"{out} holds the checkpoint of an earlier run",
            "pass --resume to continue it, or choose a new --output-dir",
        )


def _follow(flwr: FlowerCli, run_id: int, lines: list[str], console: Console, verbose: bool) -> RunStatus:
    """Relay the run's progress lines until it has finished; its final status.

    A log stream that breaks before the run finished is opened again; Flower replays the log from
    its start, so the lines already seen are skipped.
    """
    stream = {"read": 0, "skip": 0}  # lines read from the current stream; how many of them were seen before

    def relay(line: str) -> None:
        stream["read"] += 1
        if stream["read"] <= stream["skip"]:
            return
        lines.append(line)
        if PROGRESS_MARK in line:
            console.print(line.split(PROGRESS_MARK, 1)[1], highlight=False, markup=False, soft_wrap=True)
        elif verbose:
            console.print(line, highlight=False, markup=False, style="dim", soft_wrap=True)

    while True:
        stream.update(read=0, skip=len(lines))
        flwr.follow_log(run_id, relay)
        status = flwr.wait_finished(run_id)
        if status.finished:
            return status


def _why_not_completed(status: RunStatus, lines: list[str]) -> str:
    """What went wrong, in one line: the ServerApp's own reason when it gave one, else Flower's status."""
    reasons = [ln.split(PROGRESS_MARK + FAILED_MARK, 1)[1] for ln in lines if PROGRESS_MARK + FAILED_MARK in ln]
    if status.status == "finished:stopped":
        return "was stopped before it finished (`flwr stop`)"
    if reasons:
        return f"failed: {reasons[-1]}"
    details = f" ({status.details})" if status.details else ""
    if status.finished:
        return f"failed{details}: Flower reports {status.status}"
    return f"has not finished: Flower reports {status.status or 'no status'}{details}"


def _this_runs_results(out: Path, run_id: int) -> dict[str, Any]:
    """The results.json the ServerApp wrote in ``out`` for this run; empty when there is none (or another run's)."""
    from server.run_report import RESULTS

    try:
        results = json.loads((out / RESULTS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return results if isinstance(results, dict) and str(results.get("run_id")) == str(run_id) else {}


def _print_report(console: Console, out: Path, results: dict[str, Any]) -> None:
    """The final table (when a round ran), each hospital's refusal, and where the files are."""
    from fedcare.coordinator_run_config import RUN_CONFIG_FILE
    from fedcare.results_table import build_table, server_rows
    from server.run_report import PLOT, RESULTS

    rows, pooled = server_rows(results)
    if results.get("rounds"):
        console.print(build_table(rows, pooled, bool(results["settings"].get("dp")), local_columns=False))
    for name, hospital in sorted(results["hospitals"].items()):
        if hospital.get("refusal"):
            console.print(
                f"{name}: {hospital['refusal']}", highlight=False, markup=False, style="yellow", soft_wrap=True
            )
    console.print(
        f"run directory: {out}  ({RESULTS}, final_model.npz, {PLOT}, {RUN_CONFIG_FILE})", highlight=False, markup=False
    )
