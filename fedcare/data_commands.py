"""`fedcare data ...`: commands hospital IT runs on local data before joining a federation.

Exit codes (fedcare/error_output.py): 0 the data is ready, 1 the check found problems, 2 a usage
error (one line on stderr).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from fedcare.error_output import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, fail
from fedcare.errors import FedcareError

data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Check a hospital's local data (DICOM folder, EHR table or events) before training; "
    "prepare the generated simulation datasets.",
)


@data_app.callback()
def _root() -> None:
    """Check a hospital's local data before training; prepare generated datasets."""


@data_app.command()
def check(
    path: Path = typer.Argument(..., help="folder of DICOM files (searched recursively), or an EHR table/events file"),
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help="DICOM: labels CSV (default: PATH/labels.csv); events: a separate per-patient labels table",
    ),
    schema: Path | None = typer.Option(None, "--schema", help="EHR: the schema TOML (PATH is then a CSV/Parquet file)"),
    image_size: int = typer.Option(64, "--image-size", help="side of the square model input, in pixels"),
    multiframe: str = typer.Option("first", "--multiframe", help="multi-frame files: first | every | reject"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        min=1,
        help="EHR: the batch size the federation "
        "will run with; the hospital needs at least one batch of training "
        "rows [the dataset's preset, as `fedcare simulate`]",
    ),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="EHR: whether the run trains with DP-SGD (the default)"),
    series: bool = typer.Option(
        False, "--series", help="DICOM: read the folder as CT/MR series assembled into 3D volumes"
    ),
) -> None:
    """Report files found, readable and rejected DICOM, label balance, sizes and identifying attributes
    (or, with --schema, an EHR table's rows, patients, missing values and label balance)."""
    if schema is not None:
        _check_ehr(path, schema, labels, as_json, batch_size, dp)
    if series:
        _check_series(path, as_json)
    try:
        from client.data_check import check_imaging_folder, render
        from client.datasets.dicom_reader import ImagePolicy

        report = check_imaging_folder(path, labels, ImagePolicy(size=image_size, multiframe=multiframe))
    except FedcareError as exc:
        fail(exc, EXIT_USAGE)
    _emit(report, render, as_json)


def _check_series(path: Path, as_json: bool) -> None:
    """Read every series under ``path`` as a volume: exit 0 when all can train, 1 with the reasons if not."""
    from client.data_check import check_series_folder, render_series

    try:
        series_report = check_series_folder(path)
    except FedcareError as exc:
        fail(exc, EXIT_USAGE)
    _emit(series_report, render_series, as_json)


def _emit(report: Any, render: Callable[[Any], Any], as_json: bool) -> NoReturn:
    """Print a check's report (JSON or a rich table) and exit 0 when it is ok, 1 when not."""
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console(width=None if sys.stdout.isatty() else 160).print(render(report))
    raise typer.Exit(EXIT_OK if report.ok else EXIT_PROBLEM)


def _check_ehr(
    path: Path, schema_path: Path, labels: Path | None, as_json: bool, batch_size: int | None, dp: bool
) -> None:
    """Load the table/events with the loader `fedcare simulate` and a node use, and run their
    trainability check at the run's batch size: exit 0 when it would train, 1 with the reason if not."""
    from client.datasets import load_hospital
    from client.datasets.ehr_schema import EhrSchema
    from client.node_config import NodeConfig
    from fedcare.run_config import RunSettings

    try:
        dataset = "ehr-table" if EhrSchema.from_file(schema_path).kind == "table" else "ehr-events"
        try:
            batch = RunSettings.for_dataset(dataset, batch_size=batch_size, dp=dp).batch_size
        except FedcareError as exc:
            fail(exc, EXIT_USAGE)
        hospital = load_hospital(
            dataset,
            NodeConfig(
                data_path=str(path), schema=str(schema_path), labels=str(labels) if labels is not None else None
            ).data_source(),
        )
        hospital.check_trainable(batch, dp=dp)
    except FedcareError as exc:
        if not as_json:
            fail(exc, EXIT_PROBLEM)
        typer.echo(json.dumps({"ok": False, "problems": [str(exc)]}, indent=2))
        raise typer.Exit(EXIT_PROBLEM) from None
    ready = (
        f"ok: this data can join a federation ({len(hospital.y_train)} training rows, "
        f"batch size {batch}{', DP-SGD' if dp else ''})"
    )
    if as_json:
        typer.echo(json.dumps({"ok": True, "notes": [*hospital.notes, ready]}, indent=2))
    else:
        console = Console(width=None if sys.stdout.isatty() else 160)
        for line in [*hospital.notes, ready]:  # notes name the user's columns: never rich markup
            console.print(line, highlight=False, markup=False)
    raise typer.Exit(EXIT_OK)


@data_app.command()
def prepare(
    dataset: str = typer.Argument(..., help="pbc2 | synthetic-imaging | synthetic-table | synthetic-ct"),
    root: Path = typer.Argument(..., help="where to write the hospital folders (root/hospital-<i>)"),
    hospitals: int | None = typer.Option(None, help="how many hospitals [the dataset's preset]"),
    seed: int = typer.Option(0, help="seed of the split / generator"),
) -> None:
    """Write the hospital folders of a generated dataset (reused when already there)."""
    from fedcare.run_config import DATASET_PRESETS
    from simulation.generated_data import prepare_dataset

    try:
        n = hospitals or DATASET_PRESETS.get(dataset, {}).get("hospitals", 3)
        folders = prepare_dataset(dataset, root, n, seed=seed)
    except FedcareError as exc:
        fail(exc, EXIT_USAGE)
    for folder in folders:
        typer.echo(str(folder))
