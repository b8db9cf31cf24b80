"""The `fedcare` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from fedcare.audit_commands import audit_app
from fedcare.coordinator_commands import run as run_deployed
from fedcare.data_commands import data_app
from fedcare.deploy_commands import deploy_app, node_app
from fedcare.error_output import EXIT_PROBLEM, EXIT_USAGE, fail, usage_error
from fedcare.errors import BudgetExhausted, FedcareError
from fedcare.run_config import RUN_DEFAULTS

# A bug's traceback never prints local variables: they may hold a hospital's rows.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="fedcare: federated learning across hospitals (Flower + Opacus DP-SGD).")
# Wide enough for the final table when output goes to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 160)


@app.callback()
def _root() -> None:
    """fedcare: federated learning across hospitals."""


app.add_typer(data_app, name="data")
app.add_typer(audit_app, name="audit")
app.add_typer(deploy_app, name="deploy")
app.add_typer(node_app, name="node")
app.command("run")(run_deployed)   # the coordinator: launch or resume a deployed run


@app.command()
def simulate(
    dataset: str = typer.Option("fed-heart-disease", help="fed-heart-disease (4 real hospitals, tables) | "
                                "pbc2 (real PBC2 lab sequences split across hospitals) | "
                                "synthetic-imaging (generated DICOM hospitals) | ehr-table / ehr-events "
                                "(your own multi-site tables under --data-root)"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="federated rounds [dataset preset]"),
    local_epochs: Optional[int] = typer.Option(None, help="local epochs per round [preset]"),
    strategy: Optional[str] = typer.Option(None, help="fedavg | fedprox | fedadam [fedavg]"),
    model: Optional[str] = typer.Option(None, help="auto | logistic | mlp (tables) | gru (sequences) | cnn (images)"),
    epsilon: Optional[float] = typer.Option(None, help="target epsilon each hospital may spend in this run [preset]"),
    delta: Optional[float] = typer.Option(None, help="delta per hospital [1e-4]"),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="DP-SGD at every hospital (default) or plain SGD"),
    secure_aggregation: bool = typer.Option(True, "--secure-aggregation/--no-secure-aggregation",
                                            help="masked updates: the server learns only each round's sum (default on)"),
    epsilon_budget: Optional[float] = typer.Option(None, help="each hospital's lifetime budget on its data (default: --epsilon)"),
    batch_size: Optional[int] = typer.Option(None, help="expected local batch size (Poisson sampling) [preset]"),
    learning_rate: Optional[float] = typer.Option(None, help="local SGD learning rate [preset]"),
    weight_decay: Optional[float] = typer.Option(None, help="local L2 weight decay [preset]"),
    hospitals: Optional[int] = typer.Option(None, help="generated datasets: how many hospitals [preset]"),
    min_hospitals: Optional[int] = typer.Option(None, help="stop when fewer hospitals can train [2]"),
    image_size: Optional[int] = typer.Option(None, help="images: resize to this many pixels a side [64]"),
    seed: Optional[int] = typer.Option(None, help="seed for model initialisation and generated hospitals' data [0] "
                                       "(DP noise and sampling never come from it)"),
    policy: Optional[Path] = typer.Option(None, "--policy", help="give every simulated hospital the [privacy] "
                                          "policy of this hospital.toml (default: hospitals accept the run)"),
    reproducible_noise: bool = typer.Option(False, "--reproducible-noise", help="benchmarks only: key every "
                                            "hospital's DP noise from --seed; the results are marked NOT private"),
    output_dir: Path = typer.Option(Path("runs/latest"), help="where the model, results.json and plots go"),
    ledger_dir: Optional[Path] = typer.Option(None, help="hospitals' privacy ledgers (default: OUTPUT_DIR/ledgers); reuse it to accumulate epsilon across runs"),
    data_root: Optional[Path] = typer.Option(None, help="hospital folders (hospital-0, hospital-1, ...): written/reused for generated datasets (default: runs/data/DATASET); required for ehr-table / ehr-events"),
    hidden_units: Optional[int] = typer.Option(None, help="MLP width [32]"),
    proximal_mu: Optional[float] = typer.Option(None, help=f"fedprox: weight of the proximal term "
                                                f"[{RUN_DEFAULTS['proximal_mu']:g}]"),
    server_learning_rate: Optional[float] = typer.Option(None, help="fedadam: the server's step size "
                                                         f"[{RUN_DEFAULTS['server_learning_rate']:g}]"),
    max_grad_norm: Optional[float] = typer.Option(None, help="DP-SGD: per-example gradient clipping norm "
                                                  f"[{RUN_DEFAULTS['max_grad_norm']:g}]"),
    stats_budget_fraction: Optional[float] = typer.Option(None, help="DP: share of the run's epsilon the "
                                                          "feature-statistics round spends "
                                                          f"[{RUN_DEFAULTS['stats_budget_fraction']:g}]"),
    secagg_threshold: Optional[int] = typer.Option(None, help="secure aggregation: fewest hospitals a round can "
                                                   "finish with [0: a strict majority]"),
    secagg_clip_range: Optional[float] = typer.Option(None, help="secure aggregation: each update value is "
                                                      "clipped at the hospital into [-R, R] "
                                                      f"[{RUN_DEFAULTS['secagg_clip_range']:g}]"),
    local_baseline: bool = typer.Option(True, "--local-baseline/--no-local-baseline", help="also train each hospital alone, for comparison"),
    resume: bool = typer.Option(False, "--resume", help="continue the run checkpointed in OUTPUT_DIR from its last completed round"),
    pooled_baseline: bool = typer.Option(False, "--pooled-baseline/--no-pooled-baseline", help="also train one model on all hospitals' rows pooled (the central reference; simulation only)"),
    verbose: bool = typer.Option(False, help="show Flower's own log"),
) -> None:
    """Run a local multi-hospital simulation on Flower's Simulation Engine."""
    options = dict(num_rounds=rounds, local_epochs=local_epochs, strategy=strategy, model=model,
                   target_epsilon=epsilon, delta=delta, dp=dp, secure_aggregation=secure_aggregation, batch_size=batch_size, learning_rate=learning_rate,
                   weight_decay=weight_decay, hospitals=hospitals, min_hospitals=min_hospitals,
                   image_size=image_size, hidden_units=hidden_units, seed=seed, output_dir=str(output_dir),
                   resume=resume or None, proximal_mu=proximal_mu, server_learning_rate=server_learning_rate,
                   max_grad_norm=max_grad_norm, stats_budget_fraction=stats_budget_fraction,
                   secagg_threshold=secagg_threshold, secagg_clip_range=secagg_clip_range)
    try:
        _simulate(dataset, options, epsilon_budget, ledger_dir, data_root, local_baseline, pooled_baseline, verbose,
                  policy, reproducible_noise)
    except FedcareError as exc:   # the data or the run: usage errors have exited already
        if isinstance(exc, BudgetExhausted):
            exc = BudgetExhausted(exc.problem, "these simulated hospitals spent their budget in an earlier run: "
                                  "use a new --output-dir (fresh ledgers), or grant more with --epsilon-budget")
        fail(exc, EXIT_PROBLEM)


def _plain(text: str, style: str = "") -> Text:
    """A line holding the user's text (paths, hospital and column names): printed as is, never as markup."""
    return Text(text, style=style)


def _simulate(dataset: str, options: dict, epsilon_budget: float | None, ledger_dir: Path | None,
              data_root: Path | None, local_baseline: bool, pooled_baseline: bool, verbose: bool,
              policy_file: Path | None = None, reproducible_noise: bool = False) -> None:
    import time

    from client.datasets import DataSource, load_hospital, num_hospitals
    from fedcare.run_config import RunSettings
    from simulation.generated_data import GENERATED_DATASETS, prepare_dataset

    t0 = time.monotonic()
    try:
        s = RunSettings.for_dataset(dataset, **options)
    except FedcareError as exc:
        fail(exc, EXIT_USAGE)
    if dataset in GENERATED_DATASETS:
        root = data_root or Path("runs/data") / dataset
        console.print(_plain(f"preparing {s.hospitals} {dataset} hospitals in {root} (reused when already there)"))
        prepare_dataset(dataset, root, s.hospitals)
        s = s.replace(data_root=str(root))
        n = s.hospitals
    elif dataset == "fed-heart-disease":
        n = num_hospitals(dataset)
    elif dataset in ("ehr-table", "ehr-events") and data_root is not None:
        s = s.replace(data_root=str(data_root))
        n = num_hospitals(dataset, str(data_root))
        if n == 0:
            usage_error(f"{data_root} holds no hospital-<i> folders",
                        "lay out one folder per hospital: hospital-0/{table|events}.csv + schema.toml "
                        "(+ labels.csv when the schema takes labels from a labels table), ...")
    else:
        usage_error(f"`fedcare simulate --dataset {dataset}` needs the hospitals' data",
                    "pass --data-root DIR with one hospital-<i> folder per hospital (table.csv or "
                    "events.csv, plus schema.toml and, for labels in a separate table, labels.csv; "
                    "`fedcare data prepare synthetic-table DIR --hospitals N` "
                    "writes N generated ones), or run real nodes with `flwr run` (see README)")
    s = s.replace(hospitals=n, min_hospitals=min(s.min_hospitals, n))
    cache = str(Path(s.data_root) / ".fedcare-cache") if s.data_root else "fedcare-cache"
    sources = [DataSource(partition_id=i, data_root=s.data_root or None, cache_dir=cache, image_size=s.image_size)
               for i in range(n)]
    hospitals = [load_hospital(dataset, src) for src in sources]  # fail fast on missing/bad data
    for h in hospitals:
        h.check_trainable(s.batch_size, dp=s.dp)    # the check `fedcare data check` runs, same batch size
        for note in h.notes:
            console.print(_plain(f"{h.name}: {note}", "dim"), highlight=False)
    ledgers = ledger_dir or Path(s.output_dir) / "ledgers"
    if s.dp and any(Path(ledgers).glob("privacy-ledger-*.json")):
        console.print(_plain(f"reusing the privacy ledgers in {ledgers}: epsilon accumulates across runs", "yellow"))
    privacy = (f"DP-SGD, target epsilon {s.target_epsilon:g} at delta {s.delta:g} per hospital"
               if s.dp else "no DP") + (", secure aggregation" if s.secure_aggregation else ", plain aggregation")
    from shared_models.registry import resolve_model

    console.print(f"[bold]fedcare simulate[/]: {dataset}, {n} hospitals, {s.strategy}, "
                  f"{resolve_model(s.model, hospitals[0].task)}, {s.num_rounds} rounds x "
                  f"{s.local_epochs} local epoch(s), batch {s.batch_size}, lr {s.learning_rate:g}, {privacy}")

    from simulation.hospital_policy import simulated_policy
    from simulation.runner import run

    try:
        policy = simulated_policy(s, epsilon_budget, policy_file)
    except FedcareError as exc:     # --policy FILE / --epsilon-budget: the command line's settings
        fail(exc, EXIT_USAGE)
    if policy_file is not None:
        console.print(f"every hospital applies the [privacy] policy of {policy_file}", highlight=False, markup=False)
    if reproducible_noise:
        console.print("[bold yellow]--reproducible-noise: every hospital's DP noise is keyed by --seed; "
                      "these results are NOT private[/]")
    outcome = run(s, ledger_dir=ledgers, policy=policy, verbose=verbose,
                  progress=lambda line: console.print(_plain(line), highlight=False),
                  reproducible_noise=reproducible_noise)
    from server.run_report import save_results
    from simulation.summary_table import build_table, compare_with_local

    rows, pooled = compare_with_local(hospitals, outcome.results, s, local_baseline, pooled_baseline)
    console.print(build_table(rows, pooled, s.dp))
    if outcome.results.get("stopped_early"):
        console.print(_plain(outcome.results["stopped_early"], "yellow"))
    outcome.results["table"] = {"hospitals": rows, "pooled": pooled}
    save_results(s.output_dir, outcome.results)
    console.print(_plain(f"run directory: {s.output_dir}  (results.json, final_model.npz, training_curves.png); "
                         f"ledgers: {ledgers}; {time.monotonic() - t0:.0f} s"))
    if outcome.results.get("status", "completed") != "completed":   # the table and results are kept; exit 1
        raise FedcareError(f"the run is incomplete: {outcome.results['stopped_early']}",
                           f"results.json in {s.output_dir} says which rounds were done and why")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
