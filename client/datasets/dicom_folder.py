"""A hospital's labelled imaging set, read from a folder of DICOM files and a labels CSV.

The labels CSV has a `label` column (0/1) and either `file` (a path relative to the folder) or
`sop_instance_uid` (matched against each file's SOP Instance UID; `file` wins when both exist).
Every way this goes wrong in practice (missing or empty file, a ';' export, a missing column,
labels that are not 0/1, duplicates, rows naming absent files) is a FedcareError naming the
column, rows or files. DICOM files without a label are ignored and listed in `ImageSet.unlabelled`.

Before any pixel is decoded, every labelled header is checked for identifying attributes
(`phi_guard`); with require_deidentified=True (the default) one finding stops the load, and the
error names files and attribute keywords, never values. Unreadable files stop the load
(on_unreadable="error") or are dropped and listed in `ImageSet.rejected` ("skip"); never silently.
Nothing is written except complete cache entries, so an error leaves no partial state.
The pass-1 results are cached under a key holding the guard's version (table edition and rules),
so a changed guard rechecks every file; pixels are decoded (and cached) only from bytes whose
digest equals what the guard read: a file replaced between the two passes is rejected, not loaded.
Error messages name files, keywords, line numbers and causes, never a header or label value.

With multiframe="every", one file gives several samples with the file's label; `groups` holds
the file index of each sample so callers split by file and frames never straddle train/test.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

import numpy as np

from client.datasets.dicom_reader import (
    DicomRejected,
    ImagePolicy,
    os_error_cause,
    path_problem,
    quiet_pydicom,
    read_dicom_bytes,
    read_header,
    read_header_bytes,
)
from client.datasets.image_cache import HeaderIndex, ImageCache, file_digest
from client.datasets.phi_guard import guard_version, phi_findings
from fedcare.errors import FedcareError

UNREADABLE_MODES = ("error", "skip")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
LABEL_COLUMN = "label"
KEY_COLUMNS = ("file", "sop_instance_uid")
_SHOW = 5  # how many names an error message lists before "and N more"


@dataclass
class ImageSet:
    """Images ready for a CNN, and what happened to every file on the way."""

    names: list[str]  # one per sample: the relative file name, "name[frame k]" for expanded frames
    x: np.ndarray  # (n, 1, size, size) float32 in [0, 1]
    y: np.ndarray  # (n,) int64, 0/1
    groups: np.ndarray  # (n,) int64: index into `files`; split by it, never by sample
    files: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # file -> reason
    phi: dict[str, list[str]] = field(default_factory=dict)  # file -> attribute keywords
    unlabelled: list[str] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)  # original (rows, cols) -> files
    notes: list[str] = field(default_factory=list)  # facts worth telling the user (one class only, ...)
    decode_seconds: float = 0.0  # time spent decoding cache misses
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def label_counts(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in zip(*np.unique(self.y, return_counts=True))}

    @property
    def decoded_per_second(self) -> float:
        return self.cache_misses / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@dataclass
class LabelTable:
    """A validated labels CSV: key (relative file or SOP Instance UID) -> 0/1, with CSV line numbers."""

    path: Path
    key_column: str
    labels: dict[str, int]
    lines: dict[str, int]


def load_dicom_folder(
    folder: Path,
    labels_csv: Path,
    policy: ImagePolicy,
    cache_dir: Path | None = None,
    require_deidentified: bool = True,
    on_unreadable: str = "error",
    retain: Iterable[str] = (),
) -> ImageSet:
    """Read, check and decode the labelled DICOM files of `folder` (see the module docstring).

    `retain` passes PS3.15 E.3 options an approval grants (see phi_guard.RETAIN_OPTIONS).
    """
    folder = Path(folder)
    _check_load_arguments(folder, on_unreadable)
    retain = tuple(retain)
    table = read_labels(labels_csv)
    candidates = find_dicom_files(folder, exclude=[Path(labels_csv)])
    rejected: dict[str, str] = {}
    labelled, unlabelled = match_labels(folder, table, candidates, rejected)
    phi, sizes, digests = _guard_headers(folder, labelled, retain, cache_dir, require_deidentified, rejected)
    images, decode_seconds, hits, misses = _decode_pixels(folder, labelled, digests, policy, cache_dir, rejected)
    if rejected and on_unreadable == "error":
        raise unreadable_error(rejected)
    if not images:
        raise FedcareError(
            f"no usable labelled images in {folder}: {len(rejected)} file(s) rejected",
            "run `fedcare data check` on the folder to see why",
        )
    return _assemble(images, table, labelled, policy, rejected, phi, unlabelled, sizes, decode_seconds, hits, misses)


def _check_load_arguments(folder: Path, on_unreadable: str) -> None:
    """The imaging folder is a folder and the on_unreadable mode is known."""
    if not folder.is_dir():
        raise FedcareError(_folder_problem(folder), "point the node config at the folder of DICOM files")
    if on_unreadable not in UNREADABLE_MODES:
        raise FedcareError(
            f"unknown on_unreadable mode {on_unreadable!r}", f"choose one of: {', '.join(UNREADABLE_MODES)}"
        )


def _guard_headers(
    folder: Path,
    labelled: dict[str, int],
    retain: tuple[str, ...],
    cache_dir: Path | None,
    require_deidentified: bool,
    rejected: dict[str, str],
) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]], dict[str, str]]:
    """Pass 1, headers only: (phi findings, sizes, content digests) before any pixel is decoded.

    Unreadable files go to `rejected`; identifying attributes stop the load when de-identification
    is required.
    """
    phi: dict[str, list[str]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    digests: dict[str, str] = {}
    # Guard results are keyed by the guard's rule set too: a stricter guard rereads every file.
    index_key = (*retain, f"phi-guard={guard_version()}")
    index = HeaderIndex(cache_dir, folder, index_key) if cache_dir is not None else None
    for name in labelled:
        known = index.get(folder, name) if index is not None else None
        if known is not None:  # unchanged since it was last read: skip rereading and re-hashing it
            digests[name], sizes[name] = known["digest"], tuple(known["size"])
            if known["phi"]:
                phi[name] = list(known["phi"])
            continue
        try:
            findings = _read_header_facts(folder, name, retain, digests, sizes)
        except OSError as exc:
            rejected[name] = f"the file {os_error_cause(exc)}"
            continue
        except DicomRejected as exc:
            rejected[name] = exc.reason
            continue
        except (TypeError, ValueError):
            rejected[name] = "invalid Rows/Columns (0028,0010)/(0028,0011)"
            continue
        if findings:
            phi[name] = findings
        if index is not None:
            index.put(folder, name, digests[name], findings, sizes[name])
    if phi and require_deidentified:
        raise phi_error(phi, extra=len(rejected))
    if index is not None:
        index.save()
    return phi, sizes, digests


def _read_header_facts(
    folder: Path, name: str, retain: tuple[str, ...], digests: dict[str, str], sizes: dict[str, tuple[int, int]]
) -> list[str]:
    """Read one file's header: record its digest and size, return the guard's findings."""
    data = (folder / name).read_bytes()
    digests[name] = file_digest(data)
    ds = read_header_bytes(data, name)
    findings = phi_findings(ds, retain=retain)
    with quiet_pydicom():
        sizes[name] = (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0))
    return findings


def _decode_pixels(
    folder: Path,
    labelled: dict[str, int],
    digests: dict[str, str],
    policy: ImagePolicy,
    cache_dir: Path | None,
    rejected: dict[str, str],
) -> tuple[dict[str, list[np.ndarray]], float, int, int]:
    """Pass 2, pixels through the cache (a hit does not even reread the file).

    Returns (images, decode seconds, cache hits, cache misses); unusable files go to `rejected`.
    """
    cache = ImageCache(cache_dir) if cache_dir is not None else None
    decode_seconds, hits, misses = 0.0, 0, 0
    images: dict[str, list[np.ndarray]] = {}
    for name in labelled:
        if name in rejected:
            continue
        arrays = cache.get(digests[name], policy) if cache is not None else None
        if arrays is not None:
            hits += 1
            images[name] = arrays
            continue
        misses += 1
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            rejected[name] = f"the file {os_error_cause(exc)}"
            continue
        if file_digest(data) != digests[name]:  # changed since the guard read it: these bytes were never checked
            rejected[name] = "the file changed while it was being loaded (not checked, not cached): load again"
            continue
        digest = digests[name]
        t0 = time.perf_counter()
        try:
            arrays = read_dicom_bytes(data, policy, name)
        except DicomRejected as exc:
            rejected[name] = exc.reason
            continue
        finally:
            decode_seconds += time.perf_counter() - t0
        if cache is not None:
            cache.put(digest, policy, arrays)
        images[name] = arrays
    return images, decode_seconds, hits, misses


def _assemble(images, table, labelled, policy, rejected, phi, unlabelled, sizes, decode_seconds, hits, misses):
    files = [name for name in labelled if name in images]
    names, xs, ys, groups = [], [], [], []
    for index, name in enumerate(files):
        arrays = images[name]
        for k, arr in enumerate(arrays):
            names.append(name if len(arrays) == 1 else f"{name}[frame {k}]")
            xs.append(arr)
            ys.append(labelled[name])
            groups.append(index)
    x = np.stack(xs).astype(np.float32, copy=False)[:, None]
    y = np.asarray(ys, dtype=np.int64)
    notes = []
    classes = sorted(set(ys))
    if len(classes) == 1:
        notes.append(
            f"only class {classes[0]} is present ({len(ys)} samples): this hospital cannot be "
            "evaluated on its own, but can still train in the federation"
        )
    if unlabelled:
        notes.append(f"{len(unlabelled)} DICOM file(s) without a label were ignored")
    if rejected:
        notes.append(f"{len(rejected)} unreadable file(s) were skipped")
    sizes_counter = Counter(sizes[name] for name in files if name in sizes)
    return ImageSet(
        names=names,
        x=x,
        y=y,
        groups=np.asarray(groups, dtype=np.int64),
        files=files,
        rejected=dict(sorted(rejected.items())),
        phi=dict(sorted(phi.items())),
        unlabelled=unlabelled,
        sizes=sizes_counter,
        notes=notes,
        decode_seconds=decode_seconds,
        cache_hits=hits,
        cache_misses=misses,
    )


# ---------------------------------------------------------------------------------------------
# Files and labels


def find_dicom_files(folder: Path, exclude: Iterable[Path] = ()) -> list[str]:
    """Relative POSIX names of the DICOM files under `folder`, sorted.

    A file counts when its name ends in .dcm/.dicom/.dic or it holds the 'DICM' marker at byte
    128. Hidden files and folders and DICOMDIR indexes are skipped.
    """
    folder = Path(folder)
    skip = {p.resolve() for p in exclude}
    skip_names = {p.name for p in skip}  # resolving every file's path would double a cached load's time
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.name.upper() == "DICOMDIR":
            continue
        if not path.is_file() or (path.name in skip_names and path.resolve() in skip):
            continue
        if path.suffix.lower() in DICOM_SUFFIXES or _has_dicm_marker(path):
            found.append(rel.as_posix())
    return found


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_labels(labels_csv: Path) -> LabelTable:
    """Parse and validate a labels CSV; every problem is a FedcareError naming column, rows or values."""
    path = Path(labels_csv)
    where = path.name
    layout = "columns `file,label` (file relative to the folder) or `sop_instance_uid,label`, comma-separated"
    text = _read_labels_text(path, where, layout)
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader)]
    rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    key = _key_column(header, where, layout)
    if not rows:
        raise FedcareError(f"{where} has a header but no rows", "add one row per labelled image")
    k, lab = header.index(key), header.index(LABEL_COLUMN)
    _check_label_rows(rows, key, k, lab, where)
    labels, lines = _index_label_rows(rows, key, k, lab, where)
    return LabelTable(path=path, key_column=key, labels=labels, lines=lines)


def _read_labels_text(path: Path, where: str, layout: str) -> str:
    """The labels file's text: it exists, is readable UTF-8 and is not empty."""
    problem = path_problem(path)
    if problem == "does not exist":
        raise FedcareError(f"labels file not found: {path}", f"create it with {layout}")
    if problem is not None:
        raise FedcareError(f"labels file {path} {problem}", f"point it at a readable CSV file with {layout}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise FedcareError(f"{where} is not UTF-8 text", f"save it as a UTF-8 CSV with {layout}") from None
    except OSError as exc:
        raise FedcareError(
            f"labels file {path} {os_error_cause(exc)}",
            "make it readable by the user running fedcare (check its permissions)",
        ) from None
    if not text.strip():
        raise FedcareError(f"{where} is empty", f"write a header and one row per image: {layout}")
    return text


def _key_column(header: list[str], where: str, layout: str) -> str:
    """The key column (`file` or `sop_instance_uid`), after checking the delimiter and label column."""
    if len(header) == 1:
        for sep, label in ((";", "';'"), ("\t", "a tab")):
            if sep in header[0]:
                raise FedcareError(
                    f"{where} uses {label} as delimiter: one column was read ({header[0]!r})",
                    "save it comma-separated (e.g. `file,label`)",
                )
    key = next((c for c in KEY_COLUMNS if c in header), None)
    missing = ([] if key else ["file (or sop_instance_uid)"]) + ([] if LABEL_COLUMN in header else [LABEL_COLUMN])
    if missing:
        found = ", ".join(header) or "none"
        raise FedcareError(f"{where} lacks column(s): {', '.join(missing)}; columns found: {found}", f"use {layout}")
    return cast(str, key)  # not missing: found


def _check_label_rows(rows: list[tuple[int, list[str]]], key: str, k: int, lab: int, where: str) -> None:
    """Every row has a key and a 0/1 label (errors name lines, never cell values)."""
    ragged = [line for line, row in rows if len(row) <= max(k, lab)]
    if ragged:
        raise FedcareError(
            f"{where}: {len(ragged)} row(s) have too few fields (line(s) {_few(ragged)})",
            f"every row needs a value in '{key}' and '{LABEL_COLUMN}'",
        )
    blank = [line for line, row in rows if not row[k].strip()]
    if blank:
        raise FedcareError(f"{where}: {len(blank)} row(s) have an empty '{key}' (line(s) {_few(blank)})")
    bad = [line for line, row in rows if row[lab].strip() not in ("0", "1")]
    if bad:  # the cells may hold anything a person typed (names, MRNs): never echoed
        raise FedcareError(
            f"{where}: column '{LABEL_COLUMN}' must be 0 or 1 (binary); {len(bad)} row(s) hold "
            f"other values (line(s) {_few(bad)}; values not shown)",
            "map the classes to 0 (negative) and 1 (positive)",
        )


def _index_label_rows(
    rows: list[tuple[int, list[str]]], key: str, k: int, lab: int, where: str
) -> tuple[dict[str, int], dict[str, int]]:
    """(key -> label, key -> first CSV line); a key listed twice is an error."""
    labels: dict[str, int] = {}
    lines: dict[str, int] = {}
    seen: dict[str, list[int]] = {}
    for line, row in rows:
        value = _normalise_file(row[k], where, line) if key == "file" else row[k].strip()
        seen.setdefault(value, []).append(line)
        labels[value] = int(row[lab].strip())
        lines.setdefault(value, line)
    duplicates = {v: ls for v, ls in seen.items() if len(ls) > 1}
    if duplicates:
        listed = "; ".join(
            f"{v if key == 'file' else 'a UID'} (lines {', '.join(map(str, ls))})"
            for v, ls in list(duplicates.items())[:_SHOW]
        )
        raise FedcareError(
            f"{where}: {len(duplicates)} {key} value(s) listed more than once: {listed}", "keep one row per image"
        )
    return labels, lines


def _normalise_file(value: str, where: str, line: int) -> str:
    text = value.strip().replace("\\", "/")
    pure = PurePosixPath(text)
    if pure.is_absolute() or ".." in pure.parts or (len(text) > 1 and text[1] == ":"):
        raise FedcareError(f"{where} line {line}: file paths must be relative to the imaging folder and stay in it")
    return pure.as_posix()


def match_labels(
    folder: Path, table: LabelTable, candidates: list[str], rejected: dict[str, str]
) -> tuple[dict[str, int], list[str]]:
    """(labelled file -> label, unlabelled DICOM files); labels naming absent files are an error.

    In sop_instance_uid mode, files whose UID cannot be read are added to `rejected`.
    """
    folder = Path(folder)
    if table.key_column == "file":
        problems = {f: path_problem(folder / f) for f in table.labels}
        absent = [f for f, problem in problems.items() if problem == "does not exist"]
        if absent:
            raise FedcareError(
                f"{table.path.name}: {len(absent)} labelled file(s) do not exist in {folder}: {_few(absent)}",
                "fix the paths (relative to the folder) or remove those rows",
            )
        unusable = [f"{f} ({problem})" for f, problem in problems.items() if problem is not None]
        if unusable:
            raise FedcareError(
                f"{table.path.name}: {len(unusable)} labelled file(s) in {folder} cannot be read: {_few(unusable)}",
                "fix those files or links, or remove those rows",
            )
        labelled = dict(sorted(table.labels.items()))
        return labelled, [f for f in candidates if f not in labelled]

    by_uid: dict[str, list[str]] = {}
    for name in candidates:
        try:
            uid = _sop_instance_uid(folder / name)
        except DicomRejected as exc:
            rejected[name] = exc.reason
            continue
        if uid:
            by_uid.setdefault(uid, []).append(name)
    shared = [names for uid, names in by_uid.items() if len(names) > 1 and uid in table.labels]
    if shared:
        raise FedcareError(
            f"{len(shared)} SOP Instance UID(s) appear in several files: "
            + "; ".join(", ".join(n) for n in shared[:_SHOW]),
            "remove duplicate copies",
        )
    absent_lines = sorted(table.lines[u] for u in table.labels if u not in by_uid)
    if absent_lines:
        raise FedcareError(
            f"{table.path.name}: {len(absent_lines)} sop_instance_uid value(s) match no readable DICOM file "
            f"in {folder} (line(s) {_few(absent_lines)})",
            "check the UIDs, or label by `file` instead",
        )
    labelled = dict(sorted((by_uid[u][0], lab) for u, lab in table.labels.items()))
    unlabelled = [n for n in candidates if n not in labelled and n not in rejected]
    return labelled, unlabelled


def _sop_instance_uid(path: Path) -> str:
    ds = read_header(path)
    with quiet_pydicom():
        try:
            return str(ds.get("SOPInstanceUID", "") or "").strip()
        except Exception:  # a malformed UID matches nothing
            return ""


def _folder_problem(folder: Path) -> str:
    """Why the imaging folder cannot be used, naming it and the real cause."""
    problem = path_problem(folder)
    if problem == "does not exist":
        return f"imaging folder not found: {folder}"
    if problem is None:
        problem = "is a file, not a folder"
    elif problem == "is not a regular file":
        problem = "is not a folder"
    return f"imaging folder {folder} {problem}"


def phi_error(phi: dict[str, list[str]], extra: int = 0) -> FedcareError:
    """The error for labelled files that still carry identity: files and keywords, never values."""
    listed = "; ".join(f"{name} ({', '.join(kws)})" for name, kws in list(sorted(phi.items()))[:_SHOW])
    more = f"; and {len(phi) - _SHOW} more file(s)" if len(phi) > _SHOW else ""
    also = f" ({extra} other file(s) are unreadable)" if extra else ""
    return FedcareError(
        f"{len(phi)} labelled DICOM file(s) still carry identifying attributes: {listed}{more}{also}",
        "de-identify them per DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile); an attribute "
        "marked 'not inspected' could not be read completely by the check (re-export it as standard DICOM, or "
        "remove it); a flag 'not an explicit NO' must read NO; or, if this data is already approved for use as is, "
        "set node config require-deidentified=false",
    )


def unreadable_error(rejected: dict[str, str]) -> FedcareError:
    """The error for files that cannot be decoded, each with its reason."""
    items = sorted(rejected.items())
    listed = "; ".join(f"{name}: {reason}" for name, reason in items[:_SHOW])
    more = f"; and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return FedcareError(
        f"{len(items)} labelled DICOM file(s) cannot be used: {listed}{more}",
        "fix or remove them, or set on-unreadable=skip to train without them",
    )


def _few(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOW])
    return shown + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")
