"""`fedcare data check --series`: what a hospital's folder of CT/MR series holds as 3D volumes.

The same reader a 3D training run uses (``client.datasets.dicom_series``) runs over every file, and
the report lists everything at once: files found, the series that assemble into volumes (with their
size in voxels), every series refused and why, files that are not DICOM images, and files that
still carry identifying attributes (keywords only). Names are folders and file counts; no header
value (UID, position, spacing, date) is printed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.datasets.dicom_folder import find_dicom_files
from client.datasets.dicom_series import read_series_folder
from fedcare.errors import FedcareError


@dataclass
class SeriesReport:
    """The outcome of a series check; ``problems`` empty means every series can train as a volume."""

    folder: str
    files_found: int = 0
    volumes: dict[str, str] = field(default_factory=dict)  # series -> "slices x rows x columns"
    refused: list[tuple[str, str]] = field(default_factory=list)  # (series, reason)
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> reason
    phi: dict[str, list[str]] = field(default_factory=dict)  # file -> attribute keywords
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_series_folder(folder: Path) -> SeriesReport:
    """Read every series under ``folder`` as a volume and report; never raises on bad data."""
    t0 = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise FedcareError(f"not a folder: {folder}", "give the folder that holds the hospital's DICOM series")
    names = find_dicom_files(folder)
    found = read_series_folder(folder, names)
    report = SeriesReport(
        folder=str(folder),
        files_found=len(names),
        volumes={v.where: " x ".join(str(n) for n in v.voxels.shape) for v in found.volumes},
        refused=found.refused,
        unreadable=found.unreadable,
        phi=found.identifying,
    )
    if not found.volumes:
        report.problems.append("no series assembles into a volume")
    if found.refused:
        report.problems.append(f"{len(found.refused)} series cannot become a volume (see the reasons)")
    if found.identifying:
        report.problems.append(
            f"{len(found.identifying)} file(s) still carry identifying attributes: de-identify them "
            "(DICOM PS3.15 basic profile) before they join a federation"
        )
    report.seconds = time.perf_counter() - t0
    return report


def render_series(report: SeriesReport) -> Any:
    """A rich renderable of the report. Folder names, reasons and keywords are the user's text:
    every cell is a ``Text``, never parsed as markup."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    summary = Table(title=Text(f"fedcare data check (series): {report.folder}"), show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    for key, value in [
        ("DICOM files found", report.files_found),
        ("series as volumes", len(report.volumes)),
        ("series refused", len(report.refused)),
        ("files not usable", len(report.unreadable)),
        ("files with identifying attributes", len(report.phi)),
        ("seconds", f"{report.seconds:.1f}"),
    ]:
        summary.add_row(key, Text(str(value)))
    parts: list[Any] = [summary]
    for title, rows in (
        ("volumes (slices x rows x columns)", list(report.volumes.items())),
        ("series refused", report.refused),
        ("files not usable", list(report.unreadable.items())),
        (
            "identifying attributes (keywords; values are never shown)",
            [(f, ", ".join(k)) for f, k in report.phi.items()],
        ),
    ):
        if rows:
            table = Table(title=title, title_justify="left")
            table.add_column("where", overflow="fold")
            table.add_column("what", overflow="fold")
            for where, what in rows:
                table.add_row(Text(where), Text(what))
            parts.append(table)
    parts += [Text(f"problem: {p}", style="bold red") for p in report.problems]
    parts.append(Text("ok: every series can train as a volume" if report.ok else "not ready", style="bold"))
    return Group(*parts)
