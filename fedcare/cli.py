"""The `fedcare` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedcare.errors import BudgetExhausted, FedcareError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fedcare: federated learning across hospitals (Flower + Opacus DP-SGD).")
# Wide enough for the final table when output goes to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _defaults():
    from fedcare.run_config import RunSettings

    return RunSettings()


@app.callback()
def _root() -> None:
    """fedcare: federated learning across hospitals."""


@app.command()
def simulate(
    dataset: str = typer.Option("fed-heart-disease", help="bundled dataset: fed-heart-disease (4 real hospitals)"),
    rounds: int = typer.Option(_defaults().num_rounds, "--rounds", help="federated rounds"),
    local_epochs: int = typer.Option(_defaults().local_epochs, help="local epochs per round"),
    strategy: str = typer.Option(_defaults().strategy, help="fedavg | fedprox | fedadam"),
    model: str = typer.Option(_defaults().model, help="logistic | mlp"),
    epsilon: float = typer.Option(_defaults().target_epsilon, help="target epsilon each hospital may spend in this run"),
    delta: float = typer.Option(_defaults().delta, help="delta per hospital"),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="DP-SGD at every hospital (default) or plain SGD"),
    epsilon_budget: Optional[float] = typer.Option(None, help="each hospital's lifetime budget on its data (default: --epsilon)"),
    batch_size: int = typer.Option(_defaults().batch_size, help="expected local batch size (Poisson sampling)"),
    learning_rate: float = typer.Option(_defaults().learning_rate, help="local SGD learning rate"),
    weight_decay: float = typer.Option(_defaults().weight_decay, help="local L2 weight decay"),
    min_hospitals: int = typer.Option(_defaults().min_hospitals, help="stop when fewer hospitals can train"),
    seed: int = typer.Option(_defaults().seed, help="seed for model init, sampling and noise"),
    output_dir: Path = typer.Option(Path("runs/latest"), help="where the model, results.json and plots go"),
    ledger_dir: Optional[Path] = typer.Option(None, help="hospitals' privacy ledgers (default: OUTPUT_DIR/ledgers); reuse it to accumulate epsilon across runs"),
    local_baseline: bool = typer.Option(True, "--local-baseline/--no-local-baseline", help="also train each hospital alone, for comparison"),
    verbose: bool = typer.Option(False, help="show Flower's own log"),
) -> None:
    """Run a local multi-hospital simulation on Flower's Simulation Engine."""
    try:
        _simulate(dataset, rounds, local_epochs, strategy, model, epsilon, delta, dp, epsilon_budget, batch_size,
                  learning_rate, weight_decay, min_hospitals, seed, output_dir, ledger_dir, local_baseline, verbose)
    except FedcareError as exc:
        hint = exc.hint
        if isinstance(exc, BudgetExhausted):
            hint = ("these simulated hospitals spent their budget in an earlier run: use a new --output-dir "
                    "(fresh ledgers), or grant more with --epsilon-budget")
        err_console.print(f"[bold red]error:[/] {exc.problem}" + (f"\n  [yellow]what to do:[/] {hint}" if hint else ""))
        raise typer.Exit(2) from None


def _simulate(dataset, rounds, local_epochs, strategy, model, epsilon, delta, dp, epsilon_budget, batch_size,
              learning_rate, weight_decay, min_hospitals, seed, output_dir, ledger_dir, local_baseline, verbose) -> None:
    import time

    from fedcare.run_config import RunSettings

    from client.datasets import load_hospital, num_hospitals

    t0 = time.monotonic()
    s = RunSettings(dataset=dataset, model=model, strategy=strategy, num_rounds=rounds, local_epochs=local_epochs,
                    batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay, dp=dp,
                    target_epsilon=epsilon, delta=delta, min_hospitals=min_hospitals, seed=seed,
                    output_dir=str(output_dir))
    n = num_hospitals(dataset)
    s = s.replace(hospitals=n, min_hospitals=min(min_hospitals, n))
    hospitals = [load_hospital(dataset, i) for i in range(n)]  # fail fast on missing/bad data
    for h in hospitals:
        h.check_trainable(batch_size)
    ledgers = ledger_dir or output_dir / "ledgers"
    if dp and any(Path(ledgers).glob("privacy-ledger-*.json")):
        console.print(f"[yellow]reusing the privacy ledgers in {ledgers}: epsilon accumulates across runs[/]")
    privacy = f"DP-SGD, target epsilon {epsilon:g} at delta {delta:g} per hospital" if dp else "no DP"
    console.print(f"[bold]fedcare simulate[/]: {dataset}, {n} hospitals, {strategy}, {model}, {rounds} rounds x "
                  f"{local_epochs} local epoch(s), {privacy}")

    from simulation.runner import run

    outcome = run(s, ledger_dir=ledgers, epsilon_budget=epsilon_budget, progress=console.print, verbose=verbose)
    from server.run_report import save_results
    from simulation.summary_table import build_table, compare_with_local

    rows, pooled = compare_with_local(hospitals, outcome.results, s, local_baseline)
    console.print(build_table(rows, pooled, dp))
    if outcome.results.get("stopped_early"):
        console.print(f"[yellow]{outcome.results['stopped_early']}[/]")
    outcome.results["table"] = {"hospitals": rows, "pooled": pooled}
    save_results(s.output_dir, outcome.results)
    console.print(f"run directory: {s.output_dir}  (results.json, final_model.npz, training_curves.png); "
                  f"ledgers: {ledgers}; {time.monotonic() - t0:.0f} s")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
