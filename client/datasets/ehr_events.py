"""One hospital's event table (CSV or Parquet) -> per-patient, left-padded, masked sequences.

Each row is one event (a visit, a lab draw, a coded event) of one patient at one time. Rows are
sorted by (patient, time) -- ties keep file order -- and a patient's most recent ``max-length``
events are kept and LEFT-padded, so the last step is always the patient's latest event:

    x[i, t, :d]  step features in ``feature_names`` order (see ehr_schema): numeric values in raw
                 units (NaN where missing, as for tables), one-hot levels, ``col:missing``
                 indicators, and ``years-since-first-event`` (from the patient's first event in
                 the file, before truncation)
    x[i, t, d]   the mask: 1 for a real event, 0 for padding (padding steps are all zero)

so ``x`` is (patients, max-length, d + 1) float32. Missing values follow the table rules
(``client/datasets/ehr_table.py``); a ``carry-forward`` column first takes the patient's last
earlier value, and only what is still missing stays NaN with its indicator set.

For the statistics round a patient contributes one bounded vector, ``per_patient_means(x)`` (the
mean over that patient's real steps, NaN ignored); ``normalise_sequences`` then standardises the
step features with the agreed mean and scale, maps NaN to 0 (the federated mean) and zeroes
padding steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from client.datasets.ehr_schema import TIME_UNITS, EhrSchema, EventSpec
from client.datasets.ehr_table import (
    DataReport,
    TableSplit,
    category_text,
    encode_features,
    encode_labels,
    finish_report,
    id_values,
    read_frame,
    require_columns,
    row_list,
    stratified_split,
)
from fedcare.errors import FedcareError


@dataclass
class SequenceSplit(TableSplit):
    """Masked event sequences (float32, last channel = mask) and 0/1 labels, split by patient.

    Same fields as a table split; ``x_*`` are (patients, max_length, d + 1) and ``feature_names``
    are the d step features (not the mask).
    """

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.x_train.shape[1], self.x_train.shape[2]


def _events_spec(schema: EhrSchema, labels_path: Path | None) -> EventSpec:
    """The schema's [events] section, checked against whether a labels file was given."""
    spec = schema.events
    if spec is None:
        raise FedcareError(
            f"{schema.source} describes a patient table ([table]), not event sequences",
            "load it with load_ehr_table, or use an [events] schema",
        )
    if spec.label_source == "labels-table" and labels_path is None:
        raise FedcareError(
            f"{schema.source} takes labels from a labels table, but no labels file was given",
            f"pass the labels file (columns '{schema.id}' and '{schema.label}')",
        )
    if spec.label_source == "events" and labels_path is not None:
        raise FedcareError(
            f"a labels file was given, but {schema.source} takes the label from column "
            f"'{schema.label}' of the events table",
            'set label-source = "labels-table" or drop it',
        )
    return spec


def load_event_sequences(
    events_path: Path, schema: EhrSchema, seed: int, labels_path: Path | None = None, *, delimiter: str | None = None
) -> SequenceSplit:
    """Read, validate and encode one hospital's events; build sequences; split by patient, stratified.

    ``labels_path`` is the labels table (id and label columns) when the schema says
    ``label-source = "labels-table"``.
    """
    events_path = Path(events_path)
    spec = _events_spec(schema, labels_path)
    frame = read_frame(events_path, delimiter, schema.input_columns)
    require_columns(frame, schema.input_columns, events_path)
    report = DataReport(source=str(events_path), rows_read=len(frame))
    rows = np.arange(len(frame))

    ids = id_values(frame[schema.id], events_path, schema.id, rows)
    years = _time_in_years(frame[spec.time], spec.time_unit, events_path, spec.time, rows)
    patients, codes = np.unique(ids.astype(str), return_inverse=True)
    order = _time_order(codes, years, report)
    frame, ids, codes, years, rows = (
        frame.iloc[order].reset_index(drop=True),
        ids[order],
        codes[order],
        years[order],
        rows[order],
    )

    steps = encode_features(frame, schema, events_path, rows, report, ids=ids)
    since_first = years - pd.Series(years).groupby(ids, sort=False).transform("min").to_numpy()
    lo, hi = spec.time_range
    outside = int(((since_first < lo) | (since_first > hi)).sum())
    if outside:
        report.out_of_range["years-since-first-event"] = outside
        report.warnings.append(
            f"{outside} events lie outside the public time-range [{lo:g}, {hi:g}] years "
            "since the patient's first event (clipped in the statistics round)"
        )
    steps = np.concatenate([steps, since_first[:, None]], axis=1)

    if spec.label_source == "events":
        y = _labels_from_events(frame, codes, len(patients), schema, events_path, rows)
    else:
        y = _labels_from_table(Path(cast(Path, labels_path)), patients, schema, delimiter)

    x = _sequences(steps, codes, len(patients), spec.max_length, report)
    train, test = stratified_split(patients, y, schema.test_fraction, seed)
    finish_report(report, y, len(train), len(test))
    return SequenceSplit(
        name=events_path.stem,
        feature_names=schema.feature_names,
        numeric_features=schema.feature_names,
        feature_bounds=schema.feature_bounds,
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        ids_train=[str(p) for p in patients[train]],
        ids_test=[str(p) for p in patients[test]],
        report=report,
    )


def per_patient_means(x: np.ndarray) -> np.ndarray:
    """(n, d): each patient's mean over real steps of each step feature, ignoring padding and NaN.

    A feature with no observed value at any of a patient's steps is NaN (impute it like any
    missing value). Every value stays inside the feature's public bounds, so each patient
    contributes one bounded vector to the statistics round.
    """
    mask = x[..., -1:] > 0.5
    values = np.where(mask, x[..., :-1], np.nan).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN slices -> NaN, on purpose
        return np.nanmean(values, axis=1)


def normalise_sequences(x: np.ndarray, columns: list[int], mean: list[float], std: list[float]) -> np.ndarray:
    """Standardise step features with the federation's mean/std; NaN -> 0 (the mean); padding -> 0."""
    out = x.astype(np.float32, copy=True)
    cols = np.asarray(columns, dtype=int)
    out[..., cols] = (out[..., cols] - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    features = out[..., :-1]
    features[np.isnan(features)] = 0.0
    features[out[..., -1] <= 0.5] = 0.0
    return out


# -- helpers ------------------------------------------------------------------------------------


def _time_in_years(series: pd.Series, unit: str, path: Path, column: str, rows: np.ndarray) -> np.ndarray:
    if unit == "datetime":
        text = category_text(series)
        parsed = pd.to_datetime(text, errors="coerce", format="ISO8601", utc=True)
        bad = parsed.isna().to_numpy()
        values = (parsed - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds().to_numpy() / (86400 * 365.25)
        expected = "ISO 8601 dates/times (e.g. 2024-03-01 or 2024-03-01T14:30)"
    else:
        values = pd.to_numeric(category_text(series), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        values = values * TIME_UNITS[unit]
        expected = f"numbers of {unit}"
    if bad.any():
        raise FedcareError(
            f"{path}: column '{column}' (the event time) has {int(bad.sum())} empty or unreadable values "
            f"({row_list(rows[bad])}; values not shown), so events cannot be put in time order",
            f"every event needs a time; the schema's time-unit says {expected}",
        )
    return values.astype(np.float64)


def _time_order(codes: np.ndarray, years: np.ndarray, report: DataReport) -> np.ndarray:
    """Row order sorted by (patient, time), ties in file order; counts reordered patients and ties."""
    order = np.lexsort((np.arange(len(codes)), years, codes))
    frame = pd.DataFrame({"id": codes, "t": years})
    backwards = frame["t"].groupby(frame["id"], sort=False).diff() < 0
    report.patients_reordered = int(frame.loc[backwards, "id"].nunique())
    report.duplicate_times = int(frame.duplicated(["id", "t"], keep=False).sum())
    if report.patients_reordered:
        report.warnings.append(
            f"events of {report.patients_reordered} patients were not in time order in the "
            "file; they were sorted by time"
        )
    if report.duplicate_times:
        report.warnings.append(
            f"{report.duplicate_times} events share their patient and time with another "
            "event; they keep their file order"
        )
    return order


def _labels_from_events(
    frame: pd.DataFrame, codes: np.ndarray, n: int, schema: EhrSchema, path: Path, rows: np.ndarray
) -> np.ndarray:
    """One label per patient from a label column that must be constant within each patient."""
    text = category_text(frame[schema.label])
    per = pd.DataFrame({"p": codes, "v": text}).dropna().groupby("p")["v"].nunique().reindex(range(n), fill_value=0)
    if (per == 0).any():
        raise FedcareError(
            f"{path}: column '{schema.label}' (the label) is empty for every event of {int((per == 0).sum())} patients",
            "give every patient its label on its events",
        )
    if (per > 1).any():
        varying = np.isin(codes, np.flatnonzero(per.to_numpy() > 1))
        raise FedcareError(
            f"{path}: column '{schema.label}' (the label) changes within {int((per > 1).sum())} patients "
            f"({row_list(rows[varying])}); it must be constant per patient",
            "put the patient's outcome on every event, or move labels to a labels table "
            '(label-source = "labels-table")',
        )
    first = pd.DataFrame({"p": codes, "v": text}).dropna().groupby("p")["v"].first().reindex(range(n))
    first_rows = rows[np.flatnonzero(~pd.Series(codes).duplicated().to_numpy())]
    return encode_labels(first.reset_index(drop=True), schema, path, first_rows)


def _labels_from_table(path: Path, patients: np.ndarray, schema: EhrSchema, delimiter: str | None) -> np.ndarray:
    """One label per patient from the labels table; every patient must appear exactly once."""
    table = read_frame(path, delimiter, [schema.id, schema.label])
    require_columns(table, [schema.id, schema.label], path)
    rows = np.arange(len(table))
    ids = id_values(table[schema.id], path, schema.id, rows)
    repeated = pd.Series(ids).duplicated(keep=False).to_numpy()
    if repeated.any():
        raise FedcareError(
            f"{path}: {len(set(ids[repeated]))} patients appear more than once in column "
            f"'{schema.id}' ({row_list(rows[repeated])})",
            "a labels table holds one row per patient",
        )
    y = encode_labels(category_text(table[schema.label]), schema, path, rows)
    known = dict(zip(ids, y))
    unlabelled = [p for p in patients if p not in known]
    if unlabelled:
        raise FedcareError(
            f"{len(unlabelled)} patients with events have no row in the labels table {path}",
            "add their labels, or leave their events out",
        )
    no_events = len(set(ids) - set(patients))
    if no_events:
        raise FedcareError(
            f"{no_events} patients in the labels table {path} have no events",
            "leave them out of the labels table, or export their events too",
        )
    return np.array([known[p] for p in patients], dtype=np.int64)


def _sequences(steps: np.ndarray, codes: np.ndarray, n: int, length: int, report: DataReport) -> np.ndarray:
    """Left-padded (n, length, d + 1) from rows sorted by (patient, time); keeps the latest events."""
    counts = np.bincount(codes, minlength=n)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(codes)) - start[codes]  # 0 = the patient's first event
    from_end = counts[codes] - 1 - position  # 0 = the patient's latest event
    keep = from_end < length
    x = np.zeros((n, length, steps.shape[1] + 1), dtype=np.float32)
    slot = length - 1 - from_end[keep]
    x[codes[keep], slot, :-1] = steps[keep]
    x[codes[keep], slot, -1] = 1.0
    report.events_kept = int(keep.sum())
    report.events_dropped = int((~keep).sum())
    report.patients_truncated = int((counts > length).sum())
    if report.events_dropped:
        report.warnings.append(
            f"{report.patients_truncated} patients have more than max-length={length} events: "
            f"their {report.events_dropped} oldest events were dropped"
        )
    return x
