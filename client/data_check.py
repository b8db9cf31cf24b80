"""`fedcare data check`: what a hospital's imaging folder holds, and what stops it from training.

With ``--series`` the folder is read as CT/MR series assembled into 3D volumes instead (the reader a
3D run uses, ``client.datasets.dicom_series``): the series that become volumes and their size in
voxels, every series refused and why, files that are not DICOM images, and files that still carry
identifying attributes. Names are folders and file counts; no header value is printed.


Hospital IT runs this before joining a federation. Unlike the loader, which stops at the first
class of problem, the check reports everything at once: files found, which decode and which are
rejected (with reasons), label balance, original image sizes, identifying attributes per file
(keywords only, never values), and a list of problems; `ok` is False when there is any. A missing
or broken labels file is a problem, not a crash: the images are still scanned.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from client.datasets.dicom_folder import LabelTable, find_dicom_files, match_labels, read_labels
from client.datasets.dicom_reader import DicomRejected, ImagePolicy, decode_dataset, quiet_pydicom, read_header_bytes
from client.datasets.dicom_series import read_series_folder
from client.datasets.phi_guard import phi_findings
from fedcare.errors import FedcareError


class _Checked:
    """What every check's report says at the end: ok when it found no problem; and as JSON."""

    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(cast(Any, self)), "ok": self.ok}


@dataclass
class DataReport(_Checked):
    """The outcome of a folder check; `problems` empty means the folder can train as is."""

    folder: str
    labels_file: str
    policy: str
    files_found: int = 0
    readable: int = 0
    images: int = 0  # samples after the multiframe policy
    rejected: dict[str, str] = field(default_factory=dict)  # file -> reason
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)  # class -> readable labelled files
    labelled: int = 0
    unlabelled: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # "rows x cols" -> files
    phi: dict[str, list[str]] = field(default_factory=dict)  # file -> attribute keywords
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check_imaging_folder(
    folder: Path, labels_csv: Path | None = None, policy: ImagePolicy = ImagePolicy()
) -> DataReport:
    """Scan `folder` (and its labels CSV, default `folder/labels.csv`) and report; never raises on bad data."""
    t0 = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise FedcareError(f"not a folder: {folder}", "give the folder that holds the hospital's DICOM files")
    labels_path = Path(labels_csv) if labels_csv is not None else folder / "labels.csv"
    report = DataReport(folder=str(folder), labels_file=str(labels_path), policy=policy.key())
    candidates = find_dicom_files(folder, exclude=[labels_path])

    rejected: dict[str, str] = {}
    codes: Counter = Counter()
    table = _labels(labels_path, report)
    labelled, label_problem = _match_labels(folder, table, candidates, rejected, codes, report)
    sizes, readable = _scan_files(folder, candidates, labelled, policy, rejected, codes, report)
    _summarise(report, candidates, readable, rejected, codes, sizes, labelled)
    _judge(report, labelled, table is not None and not label_problem)
    report.seconds = time.perf_counter() - t0
    return report


def _match_labels(
    folder: Path,
    table: LabelTable | None,
    candidates: list[str],
    rejected: dict[str, str],
    codes: Counter,
    report: DataReport,
) -> tuple[dict[str, int], bool]:
    """(labelled file -> label, whether the labels are a problem); a mismatch is reported, not raised."""
    labelled: dict[str, int] = {}
    label_problem = table is None
    if table is not None:
        try:
            labelled, report.unlabelled = match_labels(folder, table, candidates, rejected)
        except FedcareError as exc:
            report.problems.append(str(exc))
            label_problem = True
        if rejected:  # files whose SOP Instance UID could not be read
            codes["unreadable"] += len(rejected)
    return labelled, label_problem


def _scan_files(
    folder: Path,
    candidates: list[str],
    labelled: dict[str, int],
    policy: ImagePolicy,
    rejected: dict[str, str],
    codes: Counter,
    report: DataReport,
) -> tuple[Counter, set[str]]:
    """Read and decode every found or labelled file: (original sizes -> files, readable files).

    Identifying attributes go to `report.phi`, unusable files to `rejected` (counted by code).
    """
    sizes: Counter = Counter()
    readable: set[str] = set()
    for name in sorted(set(candidates) | set(labelled)):
        if name in rejected:
            continue
        try:
            ds = read_header_bytes((folder / name).read_bytes(), name)
            findings = phi_findings(ds)
            if findings:  # reported even when the pixels turn out unusable
                report.phi[name] = findings
            with quiet_pydicom():
                shape = (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0))
            arrays = decode_dataset(ds, policy, name)
        except OSError as exc:
            rejected[name] = f"cannot read the file ({type(exc).__name__})"
            codes["not-a-file"] += 1
            continue
        except DicomRejected as exc:
            rejected[name] = exc.reason
            codes[exc.code] += 1
            continue
        except (TypeError, ValueError):
            rejected[name] = "invalid Rows/Columns (0028,0010)/(0028,0011)"
            codes["corrupt"] += 1
            continue
        readable.add(name)
        sizes[shape] += 1
        report.images += len(arrays)
    return sizes, readable


def _summarise(
    report: DataReport,
    candidates: list[str],
    readable: set[str],
    rejected: dict[str, str],
    codes: Counter,
    sizes: Counter,
    labelled: dict[str, int],
) -> None:
    """Fill the report's counts: files, rejections by code, sizes and label balance of readable files."""
    report.files_found = len(candidates)
    report.readable = len(readable)
    report.rejected = dict(sorted(rejected.items()))
    report.rejected_by_code = dict(codes.most_common())
    report.sizes = {f"{r} x {c}": n for (r, c), n in sorted(sizes.items(), key=lambda kv: -kv[1])}
    counts = Counter(str(label) for name, label in labelled.items() if name in readable)
    report.label_counts = {k: counts[k] for k in sorted(counts)}
    report.labelled = len(labelled)


def _labels(path: Path, report: DataReport) -> LabelTable | None:
    try:
        return read_labels(path)
    except FedcareError as exc:
        report.problems.append(str(exc))
        return None


def _judge(report: DataReport, labelled: dict[str, int], have_labels: bool) -> None:
    """Problems are what stops training; with a valid labels file, only labelled files count."""

    def counts(name: str) -> bool:
        return not have_labels or name in labelled

    bad = [n for n in report.rejected if counts(n)]
    phi = [n for n in report.phi if counts(n)]
    if report.files_found == 0:
        report.problems.append(
            f"no DICOM files found in {report.folder} (looked for *.dcm, *.dicom, *.dic and "
            "files with the 'DICM' marker)"
        )
    if bad:
        report.problems.append(
            f"{len(bad)} {'labelled ' if have_labels else ''}file(s) cannot be used "
            "(see 'rejected'): fix or remove them"
        )
    if phi:
        report.problems.append(
            f"{len(phi)} {'labelled ' if have_labels else ''}file(s) carry identifying "
            "attributes: de-identify them per DICOM PS3.15 Annex E, or set node config "
            "require-deidentified=false if the data is approved for use as is"
        )
    if have_labels and labelled and not report.label_counts:
        report.problems.append("no labelled file is readable")
    if len(report.rejected) > len(bad):
        report.notes.append(
            f"{len(report.rejected) - len(bad)} unlabelled file(s) are unusable too (ignored in training)"
        )
    if len(report.phi) > len(phi):
        report.notes.append(
            f"{len(report.phi) - len(phi)} unlabelled file(s) carry identifying attributes (ignored in training)"
        )
    if len(report.label_counts) == 1:
        only = next(iter(report.label_counts))
        report.notes.append(
            f"only class {only} is present: allowed for training in a federation, but this "
            "hospital cannot evaluate a classifier on its own"
        )
    if report.unlabelled:
        report.notes.append(f"{len(report.unlabelled)} DICOM file(s) have no label and will be ignored")


def _detail_tables(report: DataReport) -> list:
    """The image sizes, rejected files and identifying attributes, each a table where there are any."""
    from rich.table import Table
    from rich.text import Text

    parts = []
    if report.sizes:
        sizes = Table(title="original image sizes (rows x cols)", title_justify="left")
        sizes.add_column("size")
        sizes.add_column("files", justify="right")
        for size, n in report.sizes.items():
            sizes.add_row(Text(size), str(n))
        parts.append(sizes)
    if report.rejected:
        table = Table(title="rejected files", title_justify="left")
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for name, reason in report.rejected.items():
            table.add_row(Text(name), Text(reason))
        parts.append(table)
    if report.phi:
        table = Table(title="identifying attributes (keywords; values are never shown)", title_justify="left")
        table.add_column("file", overflow="fold")
        table.add_column("attributes", overflow="fold")
        for name, keywords in report.phi.items():
            table.add_row(Text(name), Text(", ".join(keywords)))
        parts.append(table)
    return parts


def render(report: DataReport):
    """A rich renderable of the report: summary, problems, rejected files, PHI, sizes.

    Folder and file names, reasons and keywords are the user's text: every cell and title is a
    ``Text``, never parsed as markup (``bad[kg].dcm`` stays as written, ``[/x]`` cannot crash it).
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    summary = Table(title=Text(f"fedcare data check: {report.folder}"), show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    balance = ", ".join(f"class {k}: {v}" for k, v in report.label_counts.items()) or "-"
    for key, value in [
        ("labels file", report.labels_file),
        ("DICOM files found", report.files_found),
        ("readable", report.readable),
        ("rejected", len(report.rejected)),
        ("images (after multiframe policy)", report.images),
        ("labelled files", report.labelled),
        ("label balance (readable)", balance),
        ("unlabelled files", len(report.unlabelled)),
        ("files with identifying attributes", len(report.phi)),
        ("policy", report.policy),
        ("seconds", f"{report.seconds:.1f}"),
    ]:
        summary.add_row(key, Text(str(value)))
    parts.append(summary)
    parts += _detail_tables(report)
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="yellow"))
    for problem in report.problems:
        parts.append(Text(f"problem: {problem}", style="bold red"))
    parts.append(
        Text(
            "OK: ready to train" if report.ok else f"{len(report.problems)} problem(s)",
            style="bold green" if report.ok else "bold red",
        )
    )
    return Group(*parts)


# ---- `fedcare data check --series`: CT/MR series as 3D volumes ------------------------------------
@dataclass
class SeriesReport(_Checked):
    """The outcome of a series check; ``problems`` empty means every series can train as a volume."""

    folder: str
    files_found: int = 0
    volumes: dict[str, str] = field(default_factory=dict)  # series -> "slices x rows x columns"
    segmented: int = 0  # of those, series a DICOM SEG object masks (what `--task segment` trains on)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (series, reason)
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> reason
    phi: dict[str, list[str]] = field(default_factory=dict)  # file -> attribute keywords
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


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
        segmented=sum(v.series_uid in set(found.segmentations.values()) for v in found.volumes),
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
        ("... with a segmentation (task segment)", report.segmented),
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
