"""A hospital's patient table: encoding, the patient split, and a corpus of bad files.

Every error must name the column (and file) and the number of rows, and must never show a cell's
value: ``SECRET`` is planted in the bad cells and must not appear in any message.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from client.datasets.ehr_schema import EhrSchema
from client.datasets.ehr_table import load_ehr_table
from fedcare.errors import FedcareError

SECRET = "Jane Doe 1957-03-02"

SCHEMA = """
[table]
id = "patient_id"
label = "outcome"
positive = "died"
negative = "alive"
test-fraction = 0.3

[numeric.age]
unit = "years"
range = [18, 100]

[numeric.creatinine]
unit = "mg/dL"
range = [0.2, 15]
missing = "impute"

[categorical.sex]
levels = ["F", "M"]

[categorical.admission_type]
levels = ["emergency", "elective", "urgent"]
"""


@pytest.fixture
def schema() -> EhrSchema:
    return EhrSchema.from_text(SCHEMA)


def table(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "patient_id": [f"P{i:03d}" for i in range(n)],
            "age": rng.integers(20, 90, n).astype(float),
            "creatinine": np.round(rng.uniform(0.5, 3.0, n), 2),
            "sex": rng.choice(["F", "M"], n),
            "admission_type": rng.choice(["emergency", "elective", "urgent"], n),
            "outcome": np.where(np.arange(n) % 3 == 0, "died", "alive"),
        }
    )


def write(tmp_path, frame: pd.DataFrame, name: str = "table.csv", **kw):
    path = tmp_path / name
    frame.to_csv(path, index=False, **kw)
    return path


def error(path, schema, **kw) -> str:
    with pytest.raises(FedcareError) as err:
        load_ehr_table(path, schema, seed=0, **kw)
    text = str(err.value)
    assert SECRET not in text and "Jane" not in text
    assert "\n" not in text  # one line
    return text


def test_a_clean_table_is_encoded_and_split_by_patient(tmp_path, schema):
    frame = table()
    before = set(tmp_path.iterdir())
    split = load_ehr_table(write(tmp_path, frame), schema, seed=7)
    assert set(tmp_path.iterdir()) == before | {tmp_path / "table.csv"}  # nothing else written
    assert split.feature_names == schema.feature_names == split.numeric_features
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert split.x_train.shape == (28, len(schema.feature_names)) and split.x_test.shape[0] == 12
    assert not set(split.ids_train) & set(split.ids_test)
    assert sorted(split.ids_train + split.ids_test) == sorted(frame["patient_id"])
    # stratified: 14 positives (every third patient), round(0.3 * 14) = 4 in the test set
    assert split.y_test.sum() == 4 and split.y_train.sum() == 10
    # row P005 encoded as declared
    i = split.ids_train.index("P005") if "P005" in split.ids_train else None
    x = split.x_train[i] if i is not None else split.x_test[split.ids_test.index("P005")]
    row = frame.set_index("patient_id").loc["P005"]
    names = split.feature_names
    assert x[names.index("age")] == row["age"] and x[names.index(f"sex={row['sex']}")] == 1.0
    assert x[names.index("creatinine:missing")] == 0.0
    assert split.report.rows_read == 40 and split.report.class_counts == {0: 26, 1: 14}
    assert split.report.train_patients == 28 and split.report.test_patients == 12


def test_split_is_reproducible_and_independent_of_row_order(tmp_path, schema):
    frame = table()
    a = load_ehr_table(write(tmp_path, frame), schema, seed=3)
    b = load_ehr_table(write(tmp_path, frame.iloc[::-1], "reversed.csv"), schema, seed=3)
    c = load_ehr_table(write(tmp_path, frame, "again.csv"), schema, seed=4)
    assert a.ids_test == b.ids_test and np.array_equal(a.x_train, b.x_train)
    assert a.ids_test != c.ids_test


def test_parquet_round_trip_gives_the_same_arrays(tmp_path, schema):
    frame = table()
    frame.loc[3, "creatinine"] = np.nan
    from_csv = load_ehr_table(write(tmp_path, frame), schema, seed=1)
    path = tmp_path / "table.parquet"
    frame.to_parquet(path)
    from_parquet = load_ehr_table(path, schema, seed=1)
    assert from_csv.ids_train == from_parquet.ids_train
    np.testing.assert_array_equal(from_csv.x_train, from_parquet.x_train)
    np.testing.assert_array_equal(from_csv.y_test, from_parquet.y_test)


def test_imputed_column_keeps_nan_and_sets_its_indicator(tmp_path, schema):
    frame = table()
    frame.loc[[2, 5, 11], "creatinine"] = np.nan
    split = load_ehr_table(write(tmp_path, frame), schema, seed=0)
    x = np.concatenate([split.x_train, split.x_test])
    col, ind = split.feature_names.index("creatinine"), split.feature_names.index("creatinine:missing")
    assert np.isnan(x[:, col]).sum() == 3
    np.testing.assert_array_equal(x[:, ind], np.isnan(x[:, col]).astype(np.float32))
    assert not np.isnan(np.delete(x, col, axis=1)).any()
    assert split.report.missing["creatinine"] == 3 and split.report.imputed["creatinine"] == 3
    assert split.feature_bounds["creatinine:missing"] == (0.0, 1.0)


def test_missing_value_in_an_error_column_names_column_count_and_fix(tmp_path, schema):
    frame = table()
    frame.loc[[4, 9], "age"] = np.nan
    msg = error(write(tmp_path, frame), schema)
    assert "column 'age' has 2 missing values" in msg and "data rows 5, 10" in msg
    assert 'missing = "impute"' in msg and "[numeric.age]" in msg


def test_non_numeric_text_is_counted_never_shown(tmp_path, schema):
    frame = table().astype({"creatinine": object})
    frame.loc[[1, 6, 7, 20], "creatinine"] = SECRET
    msg = error(write(tmp_path, frame), schema)
    assert "numeric column 'creatinine' (mg/dL) holds 4 values that are not finite numbers" in msg
    assert "data rows 2, 7, 8, ..." in msg and "table.csv" in msg


def test_decimal_commas_get_their_own_hint(tmp_path, schema):
    frame = table()
    frame["creatinine"] = frame["creatinine"].map(lambda v: f"{v:.1f}".replace(".", ","))
    msg = error(write(tmp_path, frame, sep=";"), schema, delimiter=";")
    assert "40 values" in msg and "decimal comma" in msg


def test_wrong_delimiter_says_which_one_to_use(tmp_path, schema):
    msg = error(write(tmp_path, table(), sep=";"), schema)
    assert "semicolons (';')" in msg and "delimiter=';'" in msg
    msg = error(write(tmp_path, table(), "tabs.csv", sep="\t"), schema)
    assert "tabs" in msg and "delimiter='\\t'" in msg
    assert load_ehr_table(write(tmp_path, table(), "ok.tsv", sep="\t"), schema, seed=0).report.rows_read == 40


def test_missing_label_column_lists_only_the_schema_columns_it_has(tmp_path, schema):
    frame = table().drop(columns=["outcome"]).assign(notes=SECRET)
    frame.columns = [*frame.columns[:-1], "Jane Doe ward 3"]  # a header name may be a patient's value
    msg = error(write(tmp_path, frame), schema)
    assert "lacks column(s) 'outcome'" in msg and "its header has 6 columns" in msg
    assert "of the schema's: 'patient_id', 'age', 'creatinine', 'sex', 'admission_type'" in msg


def test_a_table_without_its_header_row_shows_no_cell(tmp_path, schema):
    path = tmp_path / "t.csv"
    table().assign(patient_id=f"{SECRET} MRN").to_csv(path, index=False, header=False)
    msg = error(path, schema)
    assert "names none of the schema's columns (6 columns" in msg and "lack its header row" in msg


def test_rows_with_one_field_more_than_the_header_are_refused_not_shifted(tmp_path, schema):
    path = tmp_path / "t.csv"
    frame = table()
    frame.insert(0, "row", SECRET)
    path.write_text(frame.to_csv(index=False).replace("row,", "", 1))  # header one name short
    assert "data rows have more fields than its header (6 names)" in error(path, schema)


def test_a_very_wide_header_is_checked_in_one_pass_and_names_only_schema_columns(tmp_path, schema):
    names = ["patient_id", "age", "creatinine", "sex", "admission_type", "outcome", "age"]
    names += [f"{SECRET} {i % 25_000}" for i in range(50_000)]  # every name twice, none the schema's
    path = tmp_path / "wide.csv"
    path.write_text(",".join(names) + "\n")  # header only: never handed to pandas
    msg = error(path, schema)
    assert "names the schema's column(s) 'age' more than once" in msg


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "is empty (0 bytes)"),
        ("patient_id,age,creatinine,sex,admission_type,outcome\n", "has a header but no data rows"),
        ("patient_id,age,age,b\n1,2,3,4\n", "names the schema's column(s) 'age' more than once"),
        ("a,a,b\n1,2,3\n", "names none of the schema's columns (3 columns"),
    ],
)
def test_empty_and_malformed_files(tmp_path, schema, content, match):
    path = tmp_path / "t.csv"
    path.write_text(content)
    assert match in error(path, schema)


def test_file_missing_spreadsheet_and_broken_parquet(tmp_path, schema):
    assert "does not exist" in error(tmp_path / "nope.csv", schema)
    (tmp_path / "t.xlsx").write_bytes(b"PK\x03\x04")
    assert "export it as CSV" in error(tmp_path / "t.xlsx", schema)
    (tmp_path / "t.parquet").write_bytes(b"not parquet at all")
    assert "cannot be read as Parquet" in error(tmp_path / "t.parquet", schema)
    (tmp_path / "latin.csv").write_bytes("patient_id,age\nP1,\xe9\n".encode("latin-1"))
    assert "not UTF-8" in error(tmp_path / "latin.csv", schema)


def test_unknown_categories_give_count_and_declared_levels_only(tmp_path, schema):
    frame = table()
    frame.loc[[0, 3], "admission_type"] = SECRET
    frame.loc[[8], "admission_type"] = "EMERGENCY"
    msg = error(write(tmp_path, frame), schema)
    assert "column 'admission_type' has 3 values that are not declared levels (2 distinct" in msg
    assert "1 of these rows match a declared level apart from upper/lower case" in msg
    assert "declared levels: emergency, elective, urgent" in msg and "EMERGENCY" not in msg


def test_one_class_hospital_is_allowed_and_reported(tmp_path, schema):
    frame = table()
    frame["outcome"] = "alive"
    split = load_ehr_table(write(tmp_path, frame), schema, seed=0)
    assert split.y_train.sum() == 0 and split.report.class_counts == {0: 40, 1: 0}
    assert any("every patient has label 0" in w for w in split.report.warnings)


def test_label_not_binary_counts_values_and_says_how_to_declare_positive(tmp_path):
    schema = EhrSchema.from_text(SCHEMA.replace('positive = "died"\nnegative = "alive"\n', ""))
    frame = table()
    frame["outcome"] = np.arange(40) % 3
    msg = error(write(tmp_path, frame), schema)
    assert "column 'outcome' (the label) is not 0/1: it has 3 distinct values, 13 rows outside 0/1" in msg
    assert 'positive = "<value>"' in msg
    frame["outcome"] = np.arange(40) % 2 == 0  # booleans are 0/1
    assert load_ehr_table(write(tmp_path, frame), schema, seed=0).report.class_counts == {0: 20, 1: 20}


def test_label_values_outside_positive_and_negative_are_an_error(tmp_path, schema):
    frame = table()
    frame.loc[[1, 2], "outcome"] = SECRET
    msg = error(write(tmp_path, frame), schema)
    assert "2 rows with a value in neither 'positive' nor 'negative'" in msg
    only_positive = EhrSchema.from_text(SCHEMA.replace('negative = "alive"\n', ""))
    assert "3 distinct values" in error(write(tmp_path, frame), only_positive)


def test_duplicate_patient_ids_are_refused_without_showing_them(tmp_path, schema):
    frame = table()
    frame.loc[[5, 6], "patient_id"] = SECRET
    msg = error(write(tmp_path, frame), schema)
    assert "column 'patient_id' (the patient id) repeats 1 ids over 2 rows (data rows 6, 7)" in msg
    assert "[events]" in msg


def test_out_of_range_and_constant_columns_are_reported_not_refused(tmp_path, schema):
    frame = table()
    frame.loc[[0, 1], "creatinine"] = 88.4  # umol/L slipped in
    frame["sex"] = "F"
    split = load_ehr_table(write(tmp_path, frame), schema, seed=0)
    assert split.report.out_of_range == {"creatinine": 2}
    assert "sex" in split.report.constant_columns
    notes = " | ".join(split.report.notes())
    assert "2 values outside the public range [0.2, 15] mg/dL" in notes and "constant at this hospital" in notes
    frame["age"] = 150.0
    report = load_ehr_table(write(tmp_path, frame), schema, seed=0).report
    assert "check the unit" in " ".join(report.warnings) and "age" in report.constant_columns


def test_categorical_impute_marks_all_its_one_hot_columns_missing(tmp_path):
    schema = EhrSchema.from_text(SCHEMA + 'missing = "impute"\n')  # applies to admission_type
    frame = table()
    frame.loc[[0, 1], "admission_type"] = np.nan
    split = load_ehr_table(write(tmp_path, frame), schema, seed=0)
    x = np.concatenate([split.x_train, split.x_test])
    cols = [split.feature_names.index(f"admission_type={v}") for v in ("emergency", "elective", "urgent")]
    missing = x[:, split.feature_names.index("admission_type:missing")] == 1
    assert missing.sum() == 2 and np.isnan(x[missing][:, cols]).all() and not np.isnan(x[~missing][:, cols]).any()


def test_an_events_schema_is_refused_for_a_table(tmp_path):
    schema = EhrSchema.from_text(
        '[events]\nid="i"\ntime="t"\ntime-range=[0,1]\nmax-length=2\nlabel="y"\n[numeric.a]\nrange=[0,1]\n'
    )
    assert "load_event_sequences" in error(write(tmp_path, table()), schema)


def test_integer_levels_match_a_float_column_written_with_blanks(tmp_path):
    schema = EhrSchema.from_text(SCHEMA + '\n[categorical.stage]\nlevels = [1, 2, 3]\nmissing = "impute"\n')
    frame = table()
    frame["stage"] = (np.arange(40) % 3 + 1).astype(float)
    frame.loc[0, "stage"] = np.nan  # pandas now writes 1.0, 2.0, ...
    path = write(tmp_path, frame)
    assert "2.0" in path.read_text()
    split = load_ehr_table(path, schema, seed=0)
    assert split.report.missing["stage"] == 1 and split.report.imputed["stage"] == 1
