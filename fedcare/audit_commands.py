"""`fedcare audit ...`: what a privacy auditor runs over node and server audit logs.

Exit codes (fedcare/error_output.py): 0 clean, 1 findings (or an attack whose lower bound exceeds
the accountant's epsilon), 2 a usage error (one line on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedcare.error_output import usage_error
from fedcare.errors import FedcareError

audit_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Verify hospitals' and the server's signed audit logs, write the ethics-board "
    "datasheet, run an empirical membership-inference audit.",
)


@audit_app.callback()
def _root() -> None:
    """Verify audit logs, write the datasheet, run a membership-inference audit."""


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def _usage_error(problem: str, hint: str = "") -> None:
    # the one error printer: problem and hint name user-supplied paths, printed as plain text
    usage_error(problem, hint)


def _check_inputs(paths: list[Path], ledger_dirs: list[Path] | None, keys: Path | None) -> dict[str, str] | None:
    for p in paths:
        if not p.is_file():
            _usage_error(f"{p} is not a file", "pass the audit log files (JSON lines) of the nodes and the server")
    for ledger_dir in ledger_dirs or []:
        if not ledger_dir.is_dir():
            _usage_error(
                f"--ledger-dir {ledger_dir} is not a folder",
                "pass each hospital's ledger folder with its own --ledger-dir",
            )
    if keys is None:
        return None
    try:
        trusted = json.loads(keys.read_text())
        if not isinstance(trusted, dict) or not all(isinstance(v, str) for v in trusted.values()):
            raise ValueError("expected an object actor -> public key hex")
    except (OSError, ValueError) as exc:
        _usage_error(f"--trusted-keys {keys}: {exc}", 'write {"Cleveland": "<64 hex>", "server": "..."}')
    return trusted


@audit_app.command()
def verify(
    paths: list[Path] = typer.Argument(..., help="audit log files (JSON lines) of nodes and server, verified together"),
    ledger_dir: list[Path] | None = typer.Option(
        None,
        "--ledger-dir",
        help="also cross-check the hospitals' "
        "privacy-ledger-*.json files in this folder (repeat it: one "
        "folder per hospital, all are checked)",
    ),
    trusted_keys: Path | None = typer.Option(None, "--trusted-keys", help="JSON {actor: registered public key hex}"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check hash chains, signatures, node-vs-server cross-references and every recorded epsilon."""
    from audit.verify import verify as run_verify

    trusted = _check_inputs(paths, ledger_dir, trusted_keys)
    report = run_verify(paths, ledger_dir, trusted)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        console = _console()
        for f in report.findings:
            colour = "red" if f.level == "error" else "yellow"
            console.print(
                f"[{colour}]{f.level}[/] " + escape(f"{f.file}:{f.line}: {f.reason}"), highlight=False, soft_wrap=True
            )
        table = Table(title="epsilon per hospital (replayed by the RDP accountant)")
        for column in ("hospital", "data", "releases", "refusals", "delta", "epsilon"):
            table.add_column(column)
        for actor, h in sorted(report.hospitals.items()):
            rows: list[tuple[str, float | None]] = [*sorted(h.epsilon.items())] or [("-", None)]
            for fp, eps in rows:
                table.add_row(
                    Text(actor),
                    fp[:12],
                    str(len(h.releases)),
                    str(len(h.refusals)),
                    f"{h.delta.get(fp, 0):g}" if eps is not None else "-",
                    f"{eps:.4f}" if eps is not None else "no DP",
                )
        if report.hospitals:
            console.print(table)
        verdict = "[green]ok[/]" if report.ok else "[bold red]FAILED[/]"
        console.print(
            f"{verdict}: {len(report.files)} log(s), {len(report.ledgers)} ledger(s), "
            f"{len(report.errors)} error(s), {len(report.notes)} note(s)",
            highlight=False,
        )
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="audit log files of nodes and server"),
    out: Path = typer.Option(..., "--out", help="folder for audit-report.md and epsilon.png"),
    ledger_dir: list[Path] | None = typer.Option(
        None,
        "--ledger-dir",
        help="cross-check the privacy ledgers in this folder too (repeat it: one folder per hospital)",
    ),
    trusted_keys: Path | None = typer.Option(None, "--trusted-keys", help="JSON {actor: registered public key hex}"),
    attack: Path | None = typer.Option(None, "--attack", help="JSON written by `fedcare audit attack --json-out`"),
) -> None:
    """Write the ethics-board datasheet: epsilon per hospital over rounds and runs, controls, verdict."""
    from audit.report import write_verified_report
    from audit.verify import verify as run_verify

    trusted = _check_inputs(paths, ledger_dir, trusted_keys)
    attack_result = None
    if attack is not None:
        try:
            attack_result = json.loads(attack.read_text())
        except (OSError, ValueError) as exc:
            _usage_error(f"--attack {attack}: {exc}")
    verified = run_verify(paths, ledger_dir, trusted)
    typer.echo(str(write_verified_report(verified, out, attack_result)))
    raise typer.Exit(0 if verified.ok else 1)


def _attack_data(dataset: str, hospital: str | None, shadows: int, dp: bool, epsilon: float | None, threads: int):
    """The attack's options checked (usage errors exit), torch's threads set, then the rows (x, y) loaded."""
    import torch

    from simulation.membership_target import load_dataset

    if shadows < 2 or shadows % 2:
        _usage_error(f"--shadows {shadows}: need an even number >= 2")
    if epsilon is not None and (not dp or epsilon <= 0):
        _usage_error("--epsilon needs --dp and a positive value")
    torch.set_num_threads(max(1, threads))
    try:
        return load_dataset(dataset, hospital)
    except FedcareError as exc:
        _usage_error(exc.problem, exc.hint)


def _attack_model(dp: bool, hidden: int, epochs: int | None, delta: float, epsilon: float | None, rows: int):
    """The MLP the target and the shadows are: smaller and DP-trained with --dp (calibrated to --epsilon)."""
    from simulation.membership_target import FedcareMLP

    if dp:
        fn = FedcareMLP(
            hidden=min(hidden, 64), epochs=epochs or 10, batch_size=64, lr=0.5, noise_multiplier=1.0, delta=delta
        )
        if epsilon is not None:
            fn.calibrate(rows // 2, epsilon)
    else:
        fn = FedcareMLP(hidden=hidden, epochs=epochs or 30, batch_size=32, lr=0.3, delta=delta)
    return fn


def _print_attack(result: Any) -> None:
    from audit.membership_attack import ROW_HEADER, render_rows

    table = Table(title="membership-inference audit (LiRA)")
    for column in ROW_HEADER:
        table.add_column(column)
    for row in render_rows([result]):
        table.add_row(*(Text(cell) for cell in row))  # "delta=1e-05" etc.: text, never markup
    console = _console()
    console.print(table)
    console.print(
        f"target accuracy: train {result.target_train_accuracy:.3f}, held out "
        f"{result.target_test_accuracy:.3f}. {result.note}",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


@audit_app.command()
def attack(
    dataset: str = typer.Option("digits", "--dataset", help="digits (sklearn, digit < 5) | fed-heart-disease"),
    hospital: str | None = typer.Option(
        None,
        "--hospital",
        help="fed-heart-disease: one hospital's rows (Cleveland, Hungary, Switzerland, VA Long Beach) [all]",
    ),
    dp: bool = typer.Option(False, "--dp/--no-dp", help="train target and shadows with DP-SGD (Opacus)"),
    epsilon: float | None = typer.Option(
        None, "--epsilon", help="with --dp: calibrate the noise to this epsilon [noise multiplier 1.0]"
    ),
    delta: float = typer.Option(1e-5, "--delta", help="delta of the accountant and of the lower bound"),
    shadows: int = typer.Option(16, "--shadows", help="shadow models (even; each example is in half of them)"),
    epochs: int | None = typer.Option(None, "--epochs", help="training epochs per model [30 without DP, 10 with]"),
    hidden: int = typer.Option(256, "--hidden-units", help="MLP width"),
    offline: bool = typer.Option(False, "--offline", help="offline LiRA (OUT Gaussians only)"),
    seed: int = typer.Option(0, "--seed", help="seed of memberships, training and the bound's split"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads"),
    json_out: Path | None = typer.Option(
        None, "--json-out", help="also write the result as JSON (for `report --attack`)"
    ),
) -> None:
    """Empirical membership-inference audit (LiRA) of fedcare's MLP on local data; prints AUC, TPR at
    low FPR and an epsilon lower bound next to the accountant's epsilon."""
    from audit.membership_attack import run_lira

    x, y = _attack_data(dataset, hospital, shadows, dp, epsilon, threads)
    fn = _attack_model(dp, hidden, epochs, delta, epsilon, len(y))
    name = dataset + (f" ({hospital})" if hospital else "")
    privacy = f"DP-SGD, noise multiplier {fn.noise_multiplier:.3g}" if dp else "no DP"
    _console().print(
        f"training 1 target + {shadows} shadow models on {len(y)} rows of {name} ({privacy}) ...",
        highlight=False,
        markup=False,
    )
    result = run_lira(
        x,
        y,
        fn,
        shadows=shadows,
        seed=seed,
        online=not offline,
        delta=delta,
        accountant_epsilon=fn.last_epsilon,
        dataset=name,
        model=f"mlp-{fn.hidden}",
        dp=dp,
    )
    _print_attack(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
    exceeded = result.accountant_epsilon is not None and result.epsilon_lower_bound > result.accountant_epsilon
    raise typer.Exit(1 if exceeded else 0)
