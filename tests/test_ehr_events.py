"""Event sequences: time order, truncation, left padding + mask, carry-forward, labels, bad files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from client.datasets.ehr_events import load_event_sequences, normalise_sequences, per_patient_means
from client.datasets.ehr_schema import TIME_FEATURE, EhrSchema
from fedcare.errors import FedcareError

SECRET = "Jane Doe 1957-03-02"
NAN = np.nan

SCHEMA = """
[events]
id = "pid"
time = "day"
time-unit = "days"
time-range = [0, 2]
max-length = 3
label = "y"
test-fraction = 0

[numeric.hb]
unit = "g/dL"
range = [3, 25]
missing = "carry-forward"

[numeric.crp]
unit = "mg/L"
range = [0, 500]

[categorical.code]
levels = ["A", "B"]
"""
Y = 365.25


def events() -> pd.DataFrame:
    """p1: 4 events, deliberately out of time order; p2: 1 event; p3: hb never measured."""
    return pd.DataFrame([
        ("p1", 0.0, NAN, 5.0, "A", 1), ("p1", Y, 10.0, 6.0, "B", 1), ("p1", 2 * Y, NAN, 7.0, "A", 1),
        ("p1", Y / 2, 12.0, 8.0, "B", 1), ("p2", 30.0, 9.0, 1.0, "B", 0),
        ("p3", 10.0, NAN, 2.0, "A", 0), ("p3", 20.0, NAN, 3.0, "A", 0),
    ], columns=["pid", "day", "hb", "crp", "code", "y"])


@pytest.fixture
def schema() -> EhrSchema:
    return EhrSchema.from_text(SCHEMA)


def write(tmp_path, frame: pd.DataFrame, name: str = "events.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path)
    return path


def error(path, schema, **kw) -> str:
    with pytest.raises(FedcareError) as err:
        load_event_sequences(path, schema, seed=0, **kw)
    assert SECRET not in str(err.value) and "Jane" not in str(err.value)
    return str(err.value)


def test_sequences_are_time_sorted_truncated_left_padded_and_masked(tmp_path, schema):
    split = load_event_sequences(write(tmp_path, events()), schema, seed=0)
    assert split.feature_names == ["hb", "crp", "code=A", "code=B", "hb:missing", TIME_FEATURE]
    assert split.x_train.shape == (3, 3, 7) and split.x_train.dtype == np.float32 and split.input_shape == (3, 7)
    assert split.ids_train == ["p1", "p2", "p3"] and split.y_train.tolist() == [1, 0, 0] and len(split.y_test) == 0
    p1, p2, p3 = split.x_train
    # p1 keeps its 3 latest events (the day-0 one is dropped); hb at 2 years is carried forward
    np.testing.assert_allclose(p1, [[12, 8, 0, 1, 0, 0.5, 1], [10, 6, 0, 1, 0, 1.0, 1], [10, 7, 1, 0, 0, 2.0, 1]])
    # p2: one event, left padded: the last step is the real one, padding is all zero
    np.testing.assert_allclose(p2, [[0] * 7, [0] * 7, [9, 1, 0, 1, 0, 0, 1]])
    # p3: hb never measured -> NaN with its indicator; time since first event 10 days
    assert np.isnan(p3[1:, 0]).all() and (p3[1:, 4] == 1).all() and p3[0].tolist() == [0] * 7
    np.testing.assert_allclose(p3[1:, 5], [0, 10 / Y], rtol=1e-6)
    r = split.report
    assert (r.rows_read, r.patients, r.events_kept, r.events_dropped, r.patients_truncated) == (7, 3, 6, 1, 1)
    assert r.patients_reordered == 1 and r.missing["hb"] == 4 and r.imputed["hb"] == 3
    assert split.feature_bounds[TIME_FEATURE] == (0.0, 2.0) and split.feature_bounds["hb"] == (3.0, 25.0)


def test_per_patient_means_ignore_padding_and_nan(tmp_path, schema):
    x = load_event_sequences(write(tmp_path, events()), schema, seed=0).x_train
    means = per_patient_means(x)
    assert means.shape == (3, 6)
    np.testing.assert_allclose(means[0, :2], [32 / 3, 7.0])
    np.testing.assert_allclose(means[1], [9, 1, 0, 1, 0, 0])
    assert np.isnan(means[2, 0]) and means[2, 1] == 2.5 and means[2, 4] == 1.0


def test_normalise_sequences_maps_nan_to_the_mean_and_zeroes_padding(tmp_path, schema):
    x = load_event_sequences(write(tmp_path, events()), schema, seed=0).x_train
    out = normalise_sequences(x, list(range(6)), [10.0] * 6, [2.0] * 6)
    assert np.isfinite(out).all() and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., -1], x[..., -1])
    assert (out[x[..., -1] == 0] == 0).all()
    assert out[2, 1, 0] == 0.0                     # p3's missing hb -> the federation mean
    assert out[0, 0, 0] == pytest.approx((12 - 10) / 2)


def test_split_is_stratified_by_patient_and_reproducible(tmp_path):
    schema = EhrSchema.from_text(SCHEMA.replace("test-fraction = 0", "test-fraction = 0.5"))
    rows = [(f"q{i:02d}", d, 10.0, 1.0, "A", i % 2) for i in range(20) for d in (0.0, 40.0 + i)]
    path = write(tmp_path, pd.DataFrame(rows, columns=["pid", "day", "hb", "crp", "code", "y"]))
    a, b = (load_event_sequences(path, schema, seed=5) for _ in range(2))
    assert a.ids_test == b.ids_test and not set(a.ids_train) & set(a.ids_test)
    assert len(a.ids_test) == 10 and a.y_test.sum() == 5
    assert load_event_sequences(path, schema, seed=6).ids_test != a.ids_test


def test_labels_table_gives_one_label_per_patient(tmp_path):
    schema = EhrSchema.from_text(SCHEMA.replace('label = "y"', 'label = "y"\nlabel-source = "labels-table"'))
    ev = write(tmp_path, events().drop(columns=["y"]))
    labels = pd.DataFrame({"pid": ["p3", "p1", "p2"], "y": [1, 0, 0]})
    split = load_event_sequences(ev, schema, seed=0, labels_path=write(tmp_path, labels, "labels.csv"))
    assert split.y_train.tolist() == [0, 0, 1]
    assert "2 patients with events have no row" in error(ev, schema, labels_path=write(tmp_path, labels[:1], "l1.csv"))
    extra = pd.concat([labels, pd.DataFrame({"pid": [SECRET], "y": [0]})])
    assert "1 patients in the labels table" in error(ev, schema, labels_path=write(tmp_path, extra, "l2.csv"))
    assert "have no events" in error(ev, schema, labels_path=tmp_path / "l2.csv")
    dup = pd.concat([labels, labels[:1]])
    assert "1 patients appear more than once" in error(ev, schema, labels_path=write(tmp_path, dup, "l3.csv"))
    assert "no labels file was given" in error(ev, schema)
    events_schema = EhrSchema.from_text(SCHEMA)
    assert "label-source" in error(write(tmp_path, events(), "e2.csv"), events_schema, labels_path=tmp_path / "l1.csv")


def test_label_must_be_constant_per_patient(tmp_path, schema):
    frame = events()
    frame.loc[1, "y"] = 0
    msg = error(write(tmp_path, frame), schema)
    assert "column 'y' (the label) changes within 1 patients" in msg and "data rows 1, 2, 3, ..." in msg
    frame = events().astype({"y": object})
    frame.loc[frame["pid"] == "p2", "y"] = NAN
    assert "empty for every event of 1 patients" in error(write(tmp_path, frame), schema)


def test_unknown_code_and_non_numeric_lab_are_counted_not_shown(tmp_path, schema):
    frame = events()
    frame.loc[[2, 5], "code"] = SECRET
    msg = error(write(tmp_path, frame), schema)
    assert "column 'code' has 2 values that are not declared levels" in msg and "declared levels: A, B" in msg
    frame = events().astype({"crp": object})
    frame.loc[4, "crp"] = SECRET
    msg = error(write(tmp_path, frame), schema)
    assert "numeric column 'crp' (mg/L) holds 1 values" in msg and "data row 5;" in msg


def test_unreadable_time_names_the_time_column(tmp_path, schema):
    frame = events().astype({"day": object})
    frame.loc[[0, 3], "day"] = SECRET
    msg = error(write(tmp_path, frame), schema)
    assert "column 'day' (the event time) has 2 empty or unreadable values" in msg
    assert "cannot be put in time order" in msg and "numbers of days" in msg


def test_missing_value_in_an_error_column_and_missing_columns(tmp_path, schema):
    frame = events()
    frame.loc[6, "crp"] = NAN
    assert "column 'crp' has 1 missing values (data row 7)" in error(write(tmp_path, frame), schema)
    msg = error(write(tmp_path, events().drop(columns=["code", "day"])), schema)
    assert "lacks column(s) 'day', 'code'" in msg


def test_datetime_times_and_parquet_give_the_same_sequences(tmp_path, schema):
    base = load_event_sequences(write(tmp_path, events()), schema, seed=0)
    frame = events()
    frame["day"] = (pd.Timestamp("2020-01-01") + pd.to_timedelta(frame["day"], unit="D")).dt.strftime("%Y-%m-%dT%H:%M:%S")
    dated = EhrSchema.from_text(SCHEMA.replace('time-unit = "days"', 'time-unit = "datetime"'))
    as_dates = load_event_sequences(write(tmp_path, frame, "dated.csv"), dated, seed=0)
    np.testing.assert_allclose(as_dates.x_train, base.x_train, atol=1e-5, equal_nan=True)
    as_parquet = load_event_sequences(write(tmp_path, events(), "events.parquet"), schema, seed=0)
    np.testing.assert_array_equal(as_parquet.x_train, base.x_train)


def test_a_table_schema_is_refused_for_events(tmp_path):
    schema = EhrSchema.from_text('[table]\nid="pid"\nlabel="y"\n[numeric.crp]\nrange=[0,500]\n')
    assert "load_ehr_table" in error(write(tmp_path, events()), schema)
