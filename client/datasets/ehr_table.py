"""One hospital's patient-level EHR table (CSV or Parquet) -> encoded, split arrays.

Reading is strict and its errors are for the person who exported the file: each names the file,
the column and how many rows are affected, and says what to do. Messages never quote a cell's
value (any cell may be protected health information): they give counts and at most three row
numbers ("data rows", 1-based, header not counted). Unknown category values are never shown
either, not even short ones: a "short code" can still be a name or an initial, and a ClientApp
error may travel to the coordinator's log. Declared levels (public, from the schema) are shown.

Missing values. A column declared ``missing = "impute"`` keeps NaN in ``x`` where the file has no
value (for a categorical column: NaN in all its one-hot columns), and its ``col:missing``
indicator feature is 1 exactly there (``x[:, ind] == isnan(x[:, col])``). The imputed value is the
federation's mean, applied by normalisation, never computed from this hospital's rows alone:

* statistics round: a NaN contributes 0 to every sum and is not counted as observed
  (client/feature_stats.py), so the pooled mean is the mean of the observed values
  (server/feature_statistics.py divides by the observed count, not the patient count);
* normalisation: standardise as usual, then set every NaN to 0 -- the pooled mean.

Out-of-range values are kept in ``x`` and counted in the report; the statistics round and
normalisation (``HospitalData.prepared``) both clip them to the public range.
Nothing is written to disk: the loader is a pure function of (file, schema, seed).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from client.datasets.ehr_schema import CategoricalSpec, EhrSchema, NumericSpec, indicator_name, level_text
from fedcare.errors import FedcareError

PARQUET_SUFFIXES = (".parquet", ".pq")
SPREADSHEET_SUFFIXES = (".xlsx", ".xls", ".ods")
_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")


@dataclass
class DataReport:
    """What a loader found: counts only, never values. ``notes()`` gives the human lines."""

    source: str
    rows_read: int = 0
    patients: int = 0
    train_patients: int = 0
    test_patients: int = 0
    missing: dict[str, int] = field(default_factory=dict)  # empty cells per declared column
    imputed: dict[str, int] = field(default_factory=dict)  # cells left NaN (federated mean)
    out_of_range: dict[str, int] = field(default_factory=dict)  # values outside the public range
    constant_columns: list[str] = field(default_factory=list)  # one value at this hospital
    class_counts: dict[int, int] = field(default_factory=dict)  # patients per label
    # event sequences only
    events_kept: int = 0
    events_dropped: int = 0  # older than the max-length most recent events
    patients_truncated: int = 0
    patients_reordered: int = 0  # whose events were not in time order in the file
    duplicate_times: int = 0  # events sharing (patient, time) with another event
    warnings: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        lines = [
            f"{self.source}: {self.rows_read} rows, {self.patients} patients "
            f"({self.train_patients} train / {self.test_patients} test), "
            f"label 0/1: {self.class_counts.get(0, 0)}/{self.class_counts.get(1, 0)}"
        ]
        if self.events_kept:
            lines.append(
                f"{self.events_kept} events kept, {self.events_dropped} older events dropped "
                f"({self.patients_truncated} patients over max-length)"
            )
        lines += [
            f"column '{c}': {n} missing cells" + (f", {self.imputed[c]} imputed" if c in self.imputed else "")
            for c, n in self.missing.items()
            if n
        ]
        return lines + list(self.warnings)


@dataclass
class TableSplit:
    """Encoded patient-level features (float32, NaN = missing) and 0/1 labels, split by patient."""

    name: str
    feature_names: list[str]
    numeric_features: list[str]  # every encoded column (one-hot included)
    feature_bounds: dict[str, tuple[float, float]]  # public bounds of each encoded column
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    ids_train: list[str]  # local only: never leaves the hospital
    ids_test: list[str]
    report: DataReport

    @property
    def n_features(self) -> int:
        return len(self.feature_names)


def load_ehr_table(path: Path, schema: EhrSchema, seed: int, *, delimiter: str | None = None) -> TableSplit:
    """Read, validate and encode one hospital's patient table; split it by patient, stratified.

    ``delimiter`` defaults to a tab for ``.tsv`` files and a comma otherwise.
    """
    path = Path(path)
    if schema.events is not None:
        raise FedcareError(
            f"{schema.source} describes event sequences ([events]), not a patient table",
            "load it with load_event_sequences, or use a [table] schema",
        )
    frame = read_frame(path, delimiter, schema.input_columns)
    require_columns(frame, schema.input_columns, path)
    report = DataReport(source=str(path), rows_read=len(frame))
    rows = np.arange(len(frame))

    ids = id_values(frame[schema.id], path, schema.id, rows)
    _refuse_duplicate_ids(ids, path, schema.id)
    y = encode_labels(category_text(frame[schema.label]), schema, path, rows)
    x = encode_features(frame, schema, path, rows, report, ids=None)

    train, test = stratified_split(ids, y, schema.test_fraction, seed)
    finish_report(report, y, len(train), len(test))
    return TableSplit(
        name=path.stem,
        feature_names=schema.feature_names,
        numeric_features=schema.feature_names,
        feature_bounds=schema.feature_bounds,
        x_train=x[train].astype(np.float32),
        y_train=y[train],
        x_test=x[test].astype(np.float32),
        y_test=y[test],
        ids_train=[str(i) for i in ids[train]],
        ids_test=[str(i) for i in ids[test]],
        report=report,
    )


# -- reading ------------------------------------------------------------------------------------


def read_frame(path: Path, delimiter: str | None = None, columns: Collection[str] = ()) -> pd.DataFrame:
    """The file as a DataFrame: CSV cells as text (NaN = empty), Parquet with its own types.

    ``columns`` are the schema's column names: the only header names an error may quote (a file
    without its header row has a patient's cells there). A header naming one of them twice is an
    error; other repeated names are not read, so they are let be.
    """
    if not path.exists():
        raise FedcareError(f"data file {path} does not exist", "check the data-path in the node config")
    if path.is_dir():
        raise FedcareError(f"data path {path} is a folder, not a file", "point data-path at the CSV or Parquet file")
    suffix = path.suffix.lower()
    if suffix in SPREADSHEET_SUFFIXES:
        raise FedcareError(f"{path} is a spreadsheet", "export it as CSV (UTF-8) or Parquet")
    if path.stat().st_size == 0:
        raise FedcareError(f"data file {path} is empty (0 bytes)", "export the table again")
    if suffix in PARQUET_SUFFIXES:
        frame = _read_parquet(path)
    else:
        frame = _read_csv(path, delimiter or ("\t" if suffix == ".tsv" else ","), set(columns))
    if len(frame) == 0:
        raise FedcareError(f"data file {path} has a header but no data rows", "export the table again")
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise FedcareError(
            f"{path} cannot be read as Parquet ({type(exc).__name__})", "export it again, or as CSV"
        ) from None


def _read_csv(path: Path, sep: str, schema_columns: set[str]) -> pd.DataFrame:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter=sep), [])
    except UnicodeDecodeError:
        raise FedcareError(f"{path} is not UTF-8 text", "save it as CSV UTF-8 (Excel: 'CSV UTF-8')") from None
    names = [h.strip() for h in header]
    counts = Counter(names)  # linear: a header may have tens of thousands of names
    dup = sorted(n for n, k in counts.items() if k > 1 and n in schema_columns)
    if dup:
        raise FedcareError(
            f"{path}: the header names the schema's column(s) {', '.join(repr(n) for n in dup)} more than once",
            "give every column one name",
        )
    if len(names) == 1:
        for other, word in _DELIMITERS.items():
            if other != sep and other in names[0]:
                raise FedcareError(
                    f"{path} reads as one single column: its header is separated by {word}s ('{other}'), "
                    f"not {_DELIMITERS.get(sep, repr(sep))}s",
                    f"re-save it comma-separated, or load it with delimiter={other!r}",
                )
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, encoding="utf-8-sig", skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise FedcareError(f"data file {path} holds no header or rows", "export the table again") from None
    except pd.errors.ParserError as exc:
        raise FedcareError(
            f"{path} is not a well-formed CSV ({_parser_detail(exc)})",
            "every row needs the header's number of fields; quote cells that contain the delimiter",
        ) from None
    except UnicodeDecodeError:
        raise FedcareError(f"{path} is not UTF-8 text", "save it as CSV UTF-8 (Excel: 'CSV UTF-8')") from None
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas reads rows with one field more than the header as "first field = row label",
        # shifting every column by one: refuse rather than train on misaligned columns
        raise FedcareError(
            f"{path}: its data rows have more fields than its header ({len(names)} names)",
            "the header lacks a column name (or every row ends with an extra delimiter): "
            "export the table again with one header name per column",
        )
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


_PARSER_DETAILS = (
    re.compile(r"Expected \d+ fields in line \d+, saw \d+"),
    re.compile(r"EOF inside string starting at row \d+"),
)


def _parser_detail(exc: Exception) -> str:
    """The part of pandas' parser error that holds only counts and line numbers, never a cell."""
    for pattern in _PARSER_DETAILS:
        found = pattern.search(str(exc))
        if found:
            return found.group(0)
    return "malformed CSV"


def require_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Refuse a file that lacks a schema column, naming only the schema's columns.

    The file's other header names are counted, never shown: in a file without its header row (or
    with the header on a later line) they are the first patient's cells.
    """
    header = {str(c) for c in frame.columns}
    missing = [c for c in columns if c not in header]
    if not missing:
        return
    found = [c for c in columns if c in header]
    if not found:
        raise FedcareError(
            f"{path}: the first row names none of the schema's columns ({len(frame.columns)} columns; "
            "its names are not shown: without a header row they are a patient's values)",
            "the file seems to lack its header row, or the header is not on its first line: export it with "
            f"one header row naming the schema's columns ({', '.join(repr(c) for c in columns)})",
        )
    raise FedcareError(
        f"{path} lacks column(s) {', '.join(repr(c) for c in missing)} that the schema needs; its header has "
        f"{len(frame.columns)} columns, of the schema's: {', '.join(repr(c) for c in found)} (other names not shown)",
        "rename the columns to the schema's names, or export them too",
    )


# -- encoding -----------------------------------------------------------------------------------


def row_list(rows: np.ndarray, limit: int = 3) -> str:
    """'data rows 4, 9, 12, ...' for 0-based row indices (shown 1-based, header not counted)."""
    rows = np.sort(rows)
    shown = ", ".join(str(int(r) + 1) for r in rows[:limit])
    return f"data row{'s' if len(rows) > 1 else ''} {shown}{', ...' if len(rows) > limit else ''}"


def id_values(series: pd.Series, path: Path, column: str, rows: np.ndarray) -> np.ndarray:
    """Patient ids as canonical text; a missing id is an error."""
    text = category_text(series)
    absent = text.isna().to_numpy()
    if absent.any():
        raise FedcareError(
            f"{path}: column '{column}' (the patient id) is empty in {int(absent.sum())} rows "
            f"({row_list(rows[absent])})",
            "every row needs its patient id",
        )
    return text.to_numpy(dtype=object)


def _refuse_duplicate_ids(ids: np.ndarray, path: Path, column: str) -> None:
    repeated = pd.Series(ids).duplicated(keep=False).to_numpy()
    if repeated.any():
        n_ids = len(set(ids[repeated]))
        raise FedcareError(
            f"{path}: column '{column}' (the patient id) repeats {n_ids} ids over {int(repeated.sum())} rows "
            f"({row_list(np.flatnonzero(repeated))})",
            "a [table] holds one row per patient; for repeated visits use an [events] schema",
        )


def category_text(series: pd.Series) -> pd.Series:
    """Canonical text of each cell (``level_text``), NaN where the cell is empty."""
    out = series.astype(object).where(series.notna(), None)
    return out.map(lambda v: None if v is None else (level_text(v) or None)).astype(object)


def numeric_values(series: pd.Series, spec: NumericSpec, path: Path, rows: np.ndarray) -> np.ndarray:
    """float64 values, NaN where empty; non-numeric or infinite cells are an error (values not shown)."""
    if pd.api.types.is_bool_dtype(series):
        series = series.astype(float)
    if pd.api.types.is_numeric_dtype(series):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isinf(values)
        text = None
    else:
        text = (
            series.astype(object)
            .where(series.notna(), None)
            .map(lambda v: None if v is None else (str(v).strip() or None))
        )
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = (text.notna().to_numpy() & np.isnan(values)) | np.isinf(values)
    if bad.any():
        hint = "fix them, or leave the cell empty if the value is unknown"
        if text is not None:
            commas = int(text[bad].map(lambda v: bool(_DECIMAL_COMMA.match(str(v)))).sum())
            if commas:
                hint = f"{commas} of them use a decimal comma: write 3.5, not 3,5; " + hint
        unit = f" ({spec.unit})" if spec.unit else ""
        raise FedcareError(
            f"{path}: numeric column '{spec.name}'{unit} holds {int(bad.sum())} values that are not "
            f"finite numbers ({row_list(rows[bad])}; values not shown)",
            hint,
        )
    return values


def check_missing(absent: np.ndarray, column: str, policy: str, path: Path, rows: np.ndarray, kind: str) -> None:
    """A missing value in a ``missing = "error"`` column is an error naming the fix."""
    if policy == "error" and absent.any():
        raise FedcareError(
            f"{path}: column '{column}' has {int(absent.sum())} missing values ({row_list(rows[absent])})",
            f'fill them in, or declare missing = "impute" under [{kind}.{column}] in the federation\'s schema '
            f"(the federation's mean is used and a '{indicator_name(column)}' feature is added)",
        )


def one_hot(text: pd.Series, spec: CategoricalSpec, path: Path, rows: np.ndarray) -> np.ndarray:
    """(n, levels) 0/1 columns, NaN rows where the value is missing; unknown levels are an error."""
    values = text.to_numpy(dtype=object)
    present = text.notna().to_numpy()
    known = np.isin(values, np.array(spec.levels, dtype=object))
    unknown = present & ~known
    if unknown.any():
        lower = {lv.casefold() for lv in spec.levels}
        near = sum(1 for v in values[unknown] if str(v).casefold() in lower)
        distinct = len(set(values[unknown]))
        near_note = f"; {near} of these rows match a declared level apart from upper/lower case" if near else ""
        raise FedcareError(
            f"{path}: column '{spec.name}' has {int(unknown.sum())} values that are not declared levels "
            f"({distinct} distinct; {row_list(rows[unknown])}; values not shown{near_note})",
            f"declared levels: {', '.join(spec.levels)}. Recode them to these, or have the federation add the "
            f"level to [categorical.{spec.name}] levels",
        )
    out = np.stack([(values == level) for level in spec.levels], axis=1).astype(np.float64)
    out[~present] = np.nan
    return out


def encode_labels(text: pd.Series, schema: EhrSchema, path: Path, rows: np.ndarray) -> np.ndarray:
    """0/1 int64 labels from canonical label text (one per row given)."""
    col, section = schema.label, schema.section
    absent = text.isna().to_numpy()
    if absent.any():
        raise FedcareError(
            f"{path}: column '{col}' (the label) is empty in {int(absent.sum())} rows ({row_list(rows[absent])})",
            "every patient needs a label; leave unlabelled patients out",
        )
    values = text.to_numpy(dtype=object)
    distinct = sorted(set(values))
    if schema.other_label is not None:  # positive or negative = "*other*": every unlisted value takes that label
        listed = schema.negative if schema.other_label == 1 else schema.positive
        return np.where(
            np.isin(values, list(cast(tuple[str, ...], listed))), 1 - schema.other_label, schema.other_label
        ).astype(np.int64)
    if schema.positive is None:
        zero_one = {"0": 0, "1": 1, "false": 0, "true": 1}  # booleans in any case: True, FALSE, ...
        values = np.array([v.casefold() for v in values], dtype=object)
        bad = ~np.isin(values, list(zero_one))
        if bad.any():
            raise FedcareError(
                f"{path}: column '{col}' (the label) is not 0/1: it has {len(distinct)} distinct values, "
                f"{int(bad.sum())} rows outside 0/1 ({row_list(rows[bad])}; values not shown)",
                f'declare which values mean 1 with positive = "<value>" (and negative = [...]) under {section}',
            )
        return np.array([zero_one[v] for v in values], dtype=np.int64)
    if schema.negative is not None:
        bad = ~np.isin(values, list(schema.positive + schema.negative))
        if bad.any():
            raise FedcareError(
                f"{path}: column '{col}' (the label) has {int(bad.sum())} rows with a value in neither 'positive' "
                f"nor 'negative' ({row_list(rows[bad])}; values not shown)",
                f"recode them, or list the value under {section} positive/negative",
            )
    elif len(distinct) > 2:
        raise FedcareError(
            f"{path}: column '{col}' (the label) has {len(distinct)} distinct values; with only 'positive' "
            "declared it may hold two",
            f"list the values that mean 0 with negative = [...] under {section}",
        )
    return np.isin(values, list(schema.positive)).astype(np.int64)


def encode_features(
    frame: pd.DataFrame, schema: EhrSchema, path: Path, rows: np.ndarray, report: DataReport, ids: np.ndarray | None
) -> np.ndarray:
    """(n, features) float64 in ``schema.feature_names`` order, without the events time feature.

    With ``ids`` given (rows sorted by patient and time), "carry-forward" columns take the
    patient's last earlier value before what is still missing is left NaN.
    """
    blocks: list[np.ndarray] = []
    absent_of: dict[str, np.ndarray] = {}
    for spec in schema.numeric.values():
        values = numeric_values(frame[spec.name], spec, path, rows)
        report.missing[spec.name] = int(np.isnan(values).sum())
        if spec.missing == "carry-forward" and ids is not None:
            values = pd.Series(values).groupby(ids, sort=False).ffill().to_numpy(dtype=np.float64)
        absent = np.isnan(values)
        check_missing(absent, spec.name, spec.missing, path, rows, "numeric")
        present = values[~absent]
        outside = int(((present < spec.lo) | (present > spec.hi)).sum())
        if outside:
            report.out_of_range[spec.name] = outside
            unit = f" {spec.unit}" if spec.unit else ""
            note = " -- most values: check the unit" if outside > len(present) / 2 else ""
            report.warnings.append(
                f"column '{spec.name}': {outside} values outside the public range "
                f"[{spec.lo:g}, {spec.hi:g}]{unit}{note} (clipped in the statistics round)"
            )
        if len(np.unique(present)) <= 1:
            report.constant_columns.append(spec.name)
        absent_of[spec.name] = absent
        blocks.append(values[:, None])
    for cat in schema.categorical.values():
        text = category_text(frame[cat.name])
        report.missing[cat.name] = int(text.isna().sum())
        if cat.missing == "carry-forward" and ids is not None:
            text = text.groupby(ids, sort=False).ffill().astype(object)
        absent = text.isna().to_numpy()
        check_missing(absent, cat.name, cat.missing, path, rows, "categorical")
        encoded = one_hot(text, cat, path, rows)
        if len(set(text.dropna())) <= 1:
            report.constant_columns.append(cat.name)
        absent_of[cat.name] = absent
        blocks.append(encoded)
    for column in schema.imputed_columns:
        report.imputed[column] = int(absent_of[column].sum())
        blocks.append(absent_of[column][:, None].astype(np.float64))
    if report.constant_columns:
        report.warnings.append(f"constant at this hospital (allowed): {', '.join(report.constant_columns)}")
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0))


# -- splitting ----------------------------------------------------------------------------------


def stratified_split(ids: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test), one row per patient, stratified by label, seeded.

    Patients are ordered by id before shuffling, so the split does not depend on row order.
    Each class sends round(fraction * its size) patients to the test side.
    """
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for label in (0, 1):
        members = order[y[order] == label]
        test.append(rng.permutation(members)[: round(fraction * len(members))])
    is_test = np.zeros(len(ids), dtype=bool)
    is_test[np.concatenate(test)] = True
    return order[~is_test[order]], order[is_test[order]]


def finish_report(report: DataReport, y: np.ndarray, n_train: int, n_test: int) -> None:
    report.patients = len(y)
    report.train_patients, report.test_patients = n_train, n_test
    report.class_counts = {0: int((y == 0).sum()), 1: int((y == 1).sum())}
    if len(set(y.tolist())) < 2:
        only = int(y[0]) if len(y) else 0
        report.warnings.append(
            f"every patient has label {only} at this hospital (allowed in a federation; local AUC is undefined)"
        )
