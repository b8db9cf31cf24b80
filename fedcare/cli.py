"""The `fedcare` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.text import Text

from fedcare import simulate_options as opt
from fedcare.audit_commands import audit_app
from fedcare.coordinator_commands import run as run_deployed
from fedcare.data_commands import data_app
from fedcare.deploy_commands import deploy_app, node_app
from fedcare.error_output import EXIT_PROBLEM, EXIT_USAGE, fail, usage_error
from fedcare.errors import BudgetExhausted, FedcareError

if TYPE_CHECKING:
    from client.datasets.hospital_data import HospitalData
    from client.node_policy import NodePolicy
    from fedcare.run_config import RunSettings
    from simulation.runner import SimulationOutcome

# A bug's traceback never prints local variables: they may hold a hospital's rows.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="fedcare: federated learning across hospitals (Flower + Opacus DP-SGD).",
)
# Wide enough for the final table when output goes to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 160)


@app.callback()
def _root() -> None:
    """fedcare: federated learning across hospitals."""


app.add_typer(data_app, name="data")
app.add_typer(audit_app, name="audit")
app.add_typer(deploy_app, name="deploy")
app.add_typer(node_app, name="node")
app.command("run")(run_deployed)  # the coordinator: launch or resume a deployed run


@app.command()
def simulate(
    dataset: opt.Dataset = "fed-heart-disease",
    rounds: opt.Rounds = None,
    local_epochs: opt.LocalEpochs = None,
    personalise_rounds: opt.PersonaliseRounds = None,
    personalise_lr_scale: opt.PersonaliseLrScale = None,
    strategy: opt.Strategy = None,
    task: opt.Task = None,
    model: opt.Model = None,
    epsilon: opt.Epsilon = None,
    delta: opt.Delta = None,
    dp: opt.Dp = True,
    secure_aggregation: opt.SecureAggregation = True,
    epsilon_budget: opt.EpsilonBudget = None,
    batch_size: opt.BatchSize = None,
    learning_rate: opt.LearningRate = None,
    local_optimizer: opt.LocalOptimizer = None,
    patch_size: opt.PatchSize = None,
    patches_per_study: opt.PatchesPerStudy = None,
    weight_decay: opt.WeightDecay = None,
    hospitals: opt.Hospitals = None,
    min_hospitals: opt.MinHospitals = None,
    image_size: opt.ImageSize = None,
    seed: opt.Seed = None,
    policy: opt.Policy = None,
    reproducible_noise: opt.ReproducibleNoise = False,
    output_dir: opt.OutputDir = Path("runs/latest"),
    ledger_dir: opt.LedgerDir = None,
    data_root: opt.DataRoot = None,
    hidden_units: opt.HiddenUnits = None,
    proximal_mu: opt.ProximalMu = None,
    server_learning_rate: opt.ServerLearningRate = None,
    max_grad_norm: opt.MaxGradNorm = None,
    stats_budget_fraction: opt.StatsBudgetFraction = None,
    secagg_threshold: opt.SecaggThreshold = None,
    secagg_clip_range: opt.SecaggClipRange = None,
    local_baseline: opt.LocalBaseline = True,
    resume: opt.Resume = False,
    pooled_baseline: opt.PooledBaseline = False,
    verbose: opt.Verbose = False,
) -> None:
    """Run a local multi-hospital simulation on Flower's Simulation Engine."""
    options = _run_options(dict(locals()))
    try:
        _simulate(
            dataset,
            options,
            epsilon_budget,
            ledger_dir,
            data_root,
            local_baseline,
            pooled_baseline,
            verbose,
            policy,
            reproducible_noise,
        )
    except FedcareError as exc:  # the data or the run: usage errors have exited already
        fail(_with_simulation_hint(exc), EXIT_PROBLEM)


# `fedcare simulate` parameters named otherwise than the run setting they give, and those that are
# not per-run settings of RunSettings.for_dataset (the dataset, and where ledgers and data live)
_PARAMETER_SETTINGS = {"rounds": "num_rounds", "epsilon": "target_epsilon"}
_NOT_OPTIONS = {"dataset", "ledger_dir", "data_root"}


def _run_options(given: dict[str, Any]) -> dict[str, Any]:
    """The run settings among ``fedcare simulate``'s parameters, by setting name (None: not given,
    so the dataset's preset or the default applies)."""
    import dataclasses

    from fedcare.run_config import RunSettings

    fields = {f.name for f in dataclasses.fields(RunSettings)} - _NOT_OPTIONS
    options = {_PARAMETER_SETTINGS.get(k, k): v for k, v in given.items()}
    options = {k: v for k, v in options.items() if k in fields}
    return options | {"output_dir": str(options["output_dir"]), "resume": options["resume"] or None}


def _with_simulation_hint(exc: FedcareError) -> FedcareError:
    """A spent budget, with the hint that fits a simulation (fresh ledgers or a larger budget)."""
    if isinstance(exc, BudgetExhausted):
        exc = BudgetExhausted(
            exc.problem,
            "these simulated hospitals spent their budget in an earlier run: "
            "use a new --output-dir (fresh ledgers), or grant more with --epsilon-budget",
        )
    return exc


def _plain(text: str, style: str = "") -> Text:
    """A line holding the user's text (paths, hospital and column names): printed as is, never as markup."""
    return Text(text, style=style)


def _simulate(
    dataset: str,
    options: dict,
    epsilon_budget: float | None,
    ledger_dir: Path | None,
    data_root: Path | None,
    local_baseline: bool,
    pooled_baseline: bool,
    verbose: bool,
    policy_file: Path | None = None,
    reproducible_noise: bool = False,
) -> None:
    """Prepare and check the hospitals' data, run the simulation, then print and save its results."""
    import time

    from fedcare.run_config import RunSettings

    t0 = time.monotonic()
    try:
        s = RunSettings.for_dataset(dataset, **options)
    except FedcareError as exc:
        fail(exc, EXIT_USAGE)
    s, n = _with_hospital_data(dataset, s, data_root)
    s = s.replace(hospitals=n, min_hospitals=min(s.min_hospitals, n))
    hospitals = _load_hospitals(dataset, s, n)
    ledgers = ledger_dir or Path(s.output_dir) / "ledgers"
    _print_plan(dataset, s, n, hospitals, ledgers)

    from simulation.runner import run

    policy = _simulation_policy(s, epsilon_budget, policy_file, reproducible_noise)
    outcome = run(
        s,
        ledger_dir=ledgers,
        policy=policy,
        verbose=verbose,
        progress=lambda line: console.print(_plain(line), highlight=False),
        reproducible_noise=reproducible_noise,
    )
    _report(hospitals, outcome, s, local_baseline, pooled_baseline, ledgers, t0)


def _with_hospital_data(dataset: str, s: RunSettings, data_root: Path | None) -> tuple[RunSettings, int]:
    """The settings pointed at the hospitals' data (generated ones written first) and how many hospitals there are."""
    from client.datasets import num_hospitals
    from fedcare.dataset_registry import dataset_spec
    from simulation.generated_data import prepare_dataset

    spec = dataset_spec(dataset)
    if spec.generated:
        root = data_root or Path("runs/data") / dataset
        console.print(_plain(f"preparing {s.hospitals} {dataset} hospitals in {root} (reused when already there)"))
        prepare_dataset(dataset, root, s.hospitals, seed=s.seed)
        s = s.replace(data_root=str(root))
        n = s.hospitals
    elif spec.hospitals is not None:
        n = num_hospitals(dataset)
    elif spec.hospital_folders and data_root is not None:
        s = s.replace(data_root=str(data_root))
        n = num_hospitals(dataset, str(data_root))
        if n == 0:
            usage_error(
                f"{data_root} holds no hospital-<i> folders",
                "lay out one folder per hospital: hospital-0/{table|events}.csv + schema.toml "
                "(+ labels.csv when the schema takes labels from a labels table), ...",
            )
    else:
        usage_error(
            f"`fedcare simulate --dataset {dataset}` needs the hospitals' data",
            "pass --data-root DIR with one hospital-<i> folder per hospital (table.csv or "
            "events.csv, plus schema.toml and, for labels in a separate table, labels.csv; "
            "`fedcare data prepare synthetic-table DIR --hospitals N` "
            "writes N generated ones), or run real nodes with `flwr run` (see README)",
        )
    return s, n


def _load_hospitals(dataset: str, s: RunSettings, n: int) -> list[HospitalData]:
    """Load every hospital's data and check it can train (fail fast on missing or bad data); print their notes."""
    from client.datasets import load_hospital
    from client.node_config import DEFAULT_CACHE_DIR, NodeConfig

    cache = str(Path(s.data_root) / ".fedcare-cache") if s.data_root else DEFAULT_CACHE_DIR
    sources = [
        NodeConfig(partition_id=i, data_root=s.data_root or None, cache_dir=cache).data_source(s.image_size, s.task)
        for i in range(n)
    ]
    hospitals = [load_hospital(dataset, src) for src in sources]  # fail fast on missing/bad data
    for h in hospitals:
        h.check_trainable(s.batch_size, dp=s.dp)  # the check `fedcare data check` runs, same batch size
        for note in h.notes:
            console.print(_plain(f"{h.name}: {note}", "dim"), highlight=False)
    return hospitals


def _print_plan(dataset: str, s: RunSettings, n: int, hospitals: list[HospitalData], ledgers: Path) -> None:
    """Say which ledgers are reused, and the run's dataset, model, rounds and privacy, before it starts."""
    if s.dp and any(Path(ledgers).glob("privacy-ledger-*.json")):
        console.print(_plain(f"reusing the privacy ledgers in {ledgers}: epsilon accumulates across runs", "yellow"))
    privacy = (
        f"DP-SGD, target epsilon {s.target_epsilon:g} at delta {s.delta:g} per hospital" if s.dp else "no DP"
    ) + (", secure aggregation" if s.secure_aggregation else ", plain aggregation")
    from shared_models.registry import resolve_model

    console.print(
        f"[bold]fedcare simulate[/]: {dataset}, {n} hospitals, {s.strategy}, "
        f"{resolve_model(s.model, hospitals[0].task)}, {s.num_rounds} rounds x "
        f"{s.local_epochs} local epoch(s), batch {s.batch_size}, lr {s.learning_rate:g}, {privacy}"
    )


def _simulation_policy(
    s: RunSettings, epsilon_budget: float | None, policy_file: Path | None, reproducible_noise: bool
) -> NodePolicy:
    """The privacy policy every simulated hospital applies (a bad --policy / --epsilon-budget: a usage error)."""
    from simulation.hospital_policy import simulated_policy

    try:
        policy = simulated_policy(s, epsilon_budget, policy_file)
    except FedcareError as exc:  # --policy FILE / --epsilon-budget: the command line's settings
        fail(exc, EXIT_USAGE)
    if policy_file is not None:
        console.print(f"every hospital applies the [privacy] policy of {policy_file}", highlight=False, markup=False)
    if reproducible_noise:
        console.print(
            "[bold yellow]--reproducible-noise: every hospital's DP noise is keyed by --seed; "
            "these results are NOT private[/]"
        )
    return policy


def _report(
    hospitals: list[HospitalData],
    outcome: SimulationOutcome,
    s: RunSettings,
    local_baseline: bool,
    pooled_baseline: bool,
    ledgers: Path,
    t0: float,
) -> None:
    """Print the final table, save results.json, and exit 1 (table and results kept) if the run is incomplete."""
    import time

    from fedcare.results_table import build_table
    from server.run_report import save_results
    from simulation.baseline_comparison import compare_with_local

    rows, pooled = compare_with_local(hospitals, outcome.results, s, local_baseline, pooled_baseline)
    console.print(build_table(rows, pooled, s.dp))
    if outcome.results.get("stopped_early"):
        console.print(_plain(outcome.results["stopped_early"], "yellow"))
    outcome.results["table"] = {"hospitals": rows, "pooled": pooled}
    save_results(s.output_dir, outcome.results)
    console.print(
        _plain(
            f"run directory: {s.output_dir}  (results.json, final_model.npz, training_curves.png); "
            f"ledgers: {ledgers}; {time.monotonic() - t0:.0f} s"
        )
    )
    if outcome.results.get("status", "completed") != "completed":  # the table and results are kept; exit 1
        raise FedcareError(
            f"the run is incomplete: {outcome.results['stopped_early']}",
            f"results.json in {s.output_dir} says which rounds were done and why",
        )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
    sys.exit()
