"""`fedcare data ...`: commands hospital IT runs on local data before joining a federation.

Exit codes: 0 the data is ready, 1 the check found problems, 2 a usage error (one line on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedcare.errors import FedcareError

data_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Check a hospital's local data (DICOM folder, EHR table or events) before training; "
                            "prepare the generated simulation datasets.")


@data_app.callback()
def _root() -> None:
    """Check a hospital's local data before training; prepare generated datasets."""


def _usage_error(exc: FedcareError) -> None:
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    err.print(f"[bold red]error:[/] {exc.problem}" + (f" -> {exc.hint}" if exc.hint else ""),
              soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(2) from None


@data_app.command()
def check(
    path: Path = typer.Argument(..., help="folder of DICOM files (searched recursively), or an EHR table/events file"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="DICOM: labels CSV (default: PATH/labels.csv); "
                                          "events: a separate per-patient labels table"),
    schema: Optional[Path] = typer.Option(None, "--schema", help="EHR: the schema TOML (PATH is then a CSV/Parquet file)"),
    image_size: int = typer.Option(64, "--image-size", help="side of the square model input, in pixels"),
    multiframe: str = typer.Option("first", "--multiframe", help="multi-frame files: first | every | reject"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Report files found, readable and rejected DICOM, label balance, sizes and identifying attributes
    (or, with --schema, an EHR table's rows, patients, missing values and label balance)."""
    if schema is not None:
        _check_ehr(path, schema, labels, as_json)
    try:
        from client.data_check import check_imaging_folder, render
        from client.datasets.dicom_reader import ImagePolicy

        report = check_imaging_folder(path, labels, ImagePolicy(size=image_size, multiframe=multiframe))
    except FedcareError as exc:
        _usage_error(exc)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console(width=None if sys.stdout.isatty() else 160).print(render(report))
    raise typer.Exit(0 if report.ok else 1)


def _check_ehr(path: Path, schema_path: Path, labels: Path | None, as_json: bool) -> None:
    """Load the table/events exactly as the node will; exit 0 when it would train, 1 with the reason if not."""
    from client.datasets import SPLIT_SEED
    from client.datasets.ehr_schema import EhrSchema

    try:
        schema = EhrSchema.from_file(schema_path)
    except FedcareError as exc:
        _usage_error(exc)
    try:
        if schema.kind == "table":
            from client.datasets.ehr_table import load_ehr_table

            report = load_ehr_table(path, schema, seed=SPLIT_SEED).report
        else:
            from client.datasets.ehr_events import load_event_sequences

            report = load_event_sequences(path, schema, seed=SPLIT_SEED, labels_path=labels).report
    except FedcareError as exc:
        problem = f"{exc.problem}" + (f" -> {exc.hint}" if exc.hint else "")
        if as_json:
            typer.echo(json.dumps({"ok": False, "problems": [problem]}, indent=2))
        else:
            Console(width=None if sys.stdout.isatty() else 160).print(f"[bold red]problem:[/] {problem}",
                                                                      highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"ok": True, "notes": report.notes()}, indent=2))
    else:
        console = Console(width=None if sys.stdout.isatty() else 160)
        for line in report.notes():
            console.print(line, highlight=False)
        console.print("[green]ok:[/] this data can join a federation", highlight=False)
    raise typer.Exit(0)


@data_app.command()
def prepare(
    dataset: str = typer.Argument(..., help="pbc2 | synthetic-imaging"),
    root: Path = typer.Argument(..., help="where to write the hospital folders (root/hospital-<i>)"),
    hospitals: Optional[int] = typer.Option(None, help="how many hospitals [the dataset's preset]"),
    seed: int = typer.Option(0, help="seed of the split / generator"),
) -> None:
    """Write the hospital folders of a generated dataset (reused when already there)."""
    from fedcare.run_config import DATASET_PRESETS
    from simulation.generated_data import prepare_dataset

    try:
        n = hospitals or DATASET_PRESETS.get(dataset, {}).get("hospitals", 3)
        folders = prepare_dataset(dataset, root, n, seed=seed)
    except FedcareError as exc:
        _usage_error(exc)
    for folder in folders:
        typer.echo(str(folder))
