"""Event sequences: time order, truncation, left padding + mask, carry-forward, labels, bad files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from client.datasets.ehr_events import load_event_sequences, normalise_sequences, per_patient_means
from client.datasets.ehr_schema import TIME_FEATURE, EhrSchema
from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings

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
    return pd.DataFrame(
        [
            ("p1", 0.0, NAN, 5.0, "A", 1),
            ("p1", Y, 10.0, 6.0, "B", 1),
            ("p1", 2 * Y, NAN, 7.0, "A", 1),
            ("p1", Y / 2, 12.0, 8.0, "B", 1),
            ("p2", 30.0, 9.0, 1.0, "B", 0),
            ("p3", 10.0, NAN, 2.0, "A", 0),
            ("p3", 20.0, NAN, 3.0, "A", 0),
        ],
        columns=["pid", "day", "hb", "crp", "code", "y"],
    )


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
    assert out[2, 1, 0] == 0.0  # p3's missing hb -> the federation mean
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
    frame["day"] = (pd.Timestamp("2020-01-01") + pd.to_timedelta(frame["day"], unit="D")).dt.strftime(
        "%Y-%m-%dT%H:%M:%S"
    )
    dated = EhrSchema.from_text(SCHEMA.replace('time-unit = "days"', 'time-unit = "datetime"'))
    as_dates = load_event_sequences(write(tmp_path, frame, "dated.csv"), dated, seed=0)
    np.testing.assert_allclose(as_dates.x_train, base.x_train, atol=1e-5, equal_nan=True)
    as_parquet = load_event_sequences(write(tmp_path, events(), "events.parquet"), schema, seed=0)
    np.testing.assert_array_equal(as_parquet.x_train, base.x_train)


def test_a_table_schema_is_refused_for_events(tmp_path):
    schema = EhrSchema.from_text('[table]\nid="pid"\nlabel="y"\n[numeric.crp]\nrange=[0,500]\n')
    assert "load_ehr_table" in error(write(tmp_path, events()), schema)


# -- a labels table as part of the hospital's data description (hospital folder and node config) --

LABELS_SCHEMA = SCHEMA.replace('label = "y"', 'label = "y"\nlabel-source = "labels-table"')


def labelled_hospital(folder, labels: pd.DataFrame | None = None, schema: str = LABELS_SCHEMA):
    """A hospital folder as simulate and a node read it: events.csv, labels.csv, schema.toml."""
    folder.mkdir(parents=True)
    write(folder, events().drop(columns=["y"]))
    (folder / "schema.toml").write_text(schema)
    if labels is not None:
        write(folder, labels, "labels.csv")
    return folder


def load_error(dataset: str, source) -> str:
    from client.datasets import load_hospital

    with pytest.raises(FedcareError) as err:
        load_hospital(dataset, source)
    assert SECRET not in str(err.value) and "Jane" not in str(err.value)
    return str(err.value)


def test_a_hospital_folder_takes_labels_csv_beside_events_csv(tmp_path):
    from client.datasets import DataSource, load_hospital

    labels = pd.DataFrame({"pid": ["p3", "p1", "p2"], "y": [1, 0, 0]})
    labelled_hospital(tmp_path / "sites" / "hospital-0", labels)
    labelled_hospital(tmp_path / "sites" / "hospital-1", labels.assign(y=[0, 1, 1]))
    first, second = (
        load_hospital("ehr-events", DataSource(partition_id=i, data_root=str(tmp_path / "sites"))) for i in range(2)
    )
    assert first.name == "hospital-0" and first.y_train.tolist() == [0, 0, 1] and first.task == "sequence"
    assert second.y_train.tolist() == [1, 1, 0]
    assert first.x_train.shape == (3, 3, 7)


def test_a_labels_parquet_file_is_found_too(tmp_path):
    from client.datasets import DataSource, load_hospital

    folder = labelled_hospital(tmp_path / "sites" / "hospital-0")
    write(folder, pd.DataFrame({"pid": ["p1", "p2", "p3"], "y": [1, 1, 0]}), "labels.parquet")
    hospital = load_hospital("ehr-events", DataSource(partition_id=0, data_root=str(tmp_path / "sites")))
    assert hospital.y_train.tolist() == [1, 1, 0]


def test_a_hospital_folder_without_its_labels_file_says_where_to_put_it(tmp_path):
    from client.datasets import DataSource

    folder = labelled_hospital(tmp_path / "sites" / "hospital-0")
    msg = load_error("ehr-events", DataSource(partition_id=0, data_root=str(tmp_path / "sites")))
    assert "no labels.csv or labels.parquet" in msg and str(folder) in msg and "label-source" in msg


def test_a_stray_labels_file_is_refused_when_the_schema_takes_labels_from_events(tmp_path):
    from client.datasets import DataSource

    labels = pd.DataFrame({"pid": ["p1", "p2", "p3"], "y": [1, 0, 0]})
    folder = labelled_hospital(tmp_path / "sites" / "hospital-0", labels, schema=SCHEMA)
    write(folder, events())
    msg = load_error("ehr-events", DataSource(partition_id=0, data_root=str(tmp_path / "sites")))
    assert "labels.csv" in msg and "label-source" in msg


def test_a_node_reads_the_labels_file_its_config_names(tmp_path):
    from client.datasets import DataSource, load_hospital

    labels = pd.DataFrame({"pid": ["p1", "p2", "p3"], "y": [0, 1, 0]})
    folder = labelled_hospital(tmp_path / "data", labels)
    node = DataSource(
        data_path=str(folder / "events.csv"), schema=str(folder / "schema.toml"), labels=str(folder / "labels.csv")
    )
    hospital = load_hospital("ehr-events", node)
    assert hospital.name == "events" and hospital.y_train.tolist() == [0, 1, 0]
    msg = load_error("ehr-events", DataSource(data_path=str(folder / "events.csv"), schema=str(folder / "schema.toml")))
    assert "labels" in msg and "hospital.toml" in msg


def test_positive_other_makes_every_unlisted_label_value_positive(tmp_path):
    """31 diagnosis codes need not be listed: positive = "*other*" with the negatives named."""
    frame = events().astype({"y": object})
    frame["y"] = frame["pid"].map({"p1": "I21.4", "p2": "none", "p3": "E11.9"})
    schema = EhrSchema.from_text(
        SCHEMA.replace('label = "y"', 'label = "y"\npositive = "*other*"\nnegative = ["none"]')
    )
    assert load_event_sequences(write(tmp_path, frame), schema, seed=0).y_train.tolist() == [1, 0, 1]
    reverse = EhrSchema.from_text(
        SCHEMA.replace('label = "y"', 'label = "y"\npositive = ["I21.4"]\nnegative = "*other*"')
    )
    assert load_event_sequences(write(tmp_path, frame), reverse, seed=0).y_train.tolist() == [1, 0, 0]


def _labelled_sites(root, patients: int = 24):
    """Two hospital folders whose labels live in labels.csv and whose positives are "every other code"."""
    schema = LABELS_SCHEMA.replace("test-fraction = 0", "test-fraction = 0.25").replace(
        'label-source = "labels-table"', 'label-source = "labels-table"\npositive = "*other*"\nnegative = ["none"]'
    )
    for h in range(2):
        ids = [f"h{h}-{i}" for i in range(patients)]
        rows = [(p, day, 10.0 + i % 3, 1.0 + day, "AB"[i % 2]) for i, p in enumerate(ids) for day in (0.0, 20.0)]
        folder = labelled_hospital(root / f"hospital-{h}", schema=schema)
        write(folder, pd.DataFrame(rows, columns=["pid", "day", "hb", "crp", "code"]))
        codes = ["none" if i % 2 else f"C{i}" for i in range(patients)]
        write(folder, pd.DataFrame({"pid": ids, "y": codes}), "labels.csv")
    return root


@pytest.mark.parametrize("layout", ["hospital folders", "node config"])
def test_a_federation_trains_on_events_whose_labels_are_a_separate_file(tmp_path, monkeypatch, layout):
    """The ClientApp reads labels.csv beside events.csv (simulate's --data-root) or the labels file
    its node config names (a deployed node), in the federation's own round loop."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.federation_loop import run_federation
    from tests.support.inprocess_grid import PERMISSIVE, RUN_ID, InProcessGrid

    for attr, value in (("_run_id", RUN_ID), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)

    root = _labelled_sites(tmp_path / "sites")
    nodes = {}
    for i in range(2):
        folder = root / f"hospital-{i}"
        data = (
            {"data-root": str(root), "partition-id": i}
            if layout == "hospital folders"
            else {
                "data-path": str(folder / "events.csv"),
                "schema": str(folder / "schema.toml"),
                "labels": str(folder / "labels.csv"),
            }
        )
        nodes[100 + i] = {**data, "ledger-dir": str(tmp_path / "ledgers"), "epsilon-budget": 1.0, **PERMISSIVE}
    s = RunSettings(
        dataset="ehr-events",
        num_rounds=1,
        hospitals=2,
        batch_size=4,
        dp=False,
        secure_aggregation=False,
        output_dir=str(tmp_path / "out"),
    )
    progress: list[str] = []
    result = run_federation(InProcessGrid(nodes), s, 2, progress.append, timeout=5, run_id=RUN_ID)
    assert result.stopped_early is None and len(result.rounds) == 1, progress
    assert len(result.rounds[0].trained) == 2 and result.rounds[0].failed == {}
