"""The EHR schema: parsing, encoded feature names/bounds, and precise errors for a bad schema."""

from __future__ import annotations

import pytest

from client.datasets.ehr_schema import TIME_FEATURE, EhrSchema
from fedcare.errors import FedcareError

TABLE = """
[table]
id = "patient_id"
label = "outcome"
positive = "died"
test-fraction = 0.25

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
missing = "impute"
"""

EVENTS = """
[events]
id = "pid"
time = "day"
time-unit = "days"
time-range = [0, 5]
max-length = 4
label = "y"

[numeric.hb]
unit = "g/dL"
range = [3, 25]
missing = "carry-forward"

[categorical.code]
levels = [10, 20]
"""


def test_table_schema_gives_encoded_names_and_public_bounds(tmp_path):
    path = tmp_path / "schema.toml"
    path.write_text(TABLE)
    schema = EhrSchema.from_file(path)
    assert schema.kind == "table" and schema.events is None
    assert schema.id == "patient_id" and schema.label == "outcome" and schema.positive == ("died",)
    assert schema.test_fraction == 0.25
    assert schema.feature_names == [
        "age",
        "creatinine",
        "sex=F",
        "sex=M",
        "admission_type=emergency",
        "admission_type=elective",
        "admission_type=urgent",
        "creatinine:missing",
        "admission_type:missing",
    ]
    assert schema.numeric_bounds == {"age": (18.0, 100.0), "creatinine": (0.2, 15.0)}
    bounds = schema.feature_bounds
    assert list(bounds) == schema.feature_names
    assert (
        bounds["age"] == (18.0, 100.0) and bounds["sex=M"] == (0.0, 1.0) and bounds["creatinine:missing"] == (0.0, 1.0)
    )
    assert schema.input_columns == ["patient_id", "outcome", "age", "creatinine", "sex", "admission_type"]
    assert schema.imputed_columns == ["creatinine", "admission_type"]


def test_events_schema_adds_the_time_feature_and_integer_levels_become_text():
    schema = EhrSchema.from_text(EVENTS)
    assert schema.kind == "events" and schema.events.max_length == 4 and schema.events.label_source == "events"
    assert schema.feature_names == ["hb", "code=10", "code=20", "hb:missing", TIME_FEATURE]
    assert schema.feature_bounds[TIME_FEATURE] == (0.0, 5.0)
    assert schema.input_columns == ["pid", "day", "y", "hb", "code"]
    assert schema.test_fraction == 0.3  # the default


def test_digest_ignores_formatting_but_not_meaning():
    a = EhrSchema.from_text(TABLE)
    b = EhrSchema.from_text("# a comment\n" + TABLE.replace(" = ", "="))
    c = EhrSchema.from_text(TABLE.replace("[0.2, 15]", "[0.1, 15]"))
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize(
    "text,match",
    [
        (
            TABLE.replace('unit = "years"', 'unti = "years"'),
            r"\[numeric.age\] has an unknown key 'unti'.*did you mean 'unit'",
        ),
        (TABLE.replace("[18, 100]", "[100, 18]"), r"\[numeric.age\] 'range' = \[100, 18\] needs lo < hi"),
        (TABLE.replace("[18, 100]", "[18, 18]"), r"needs lo < hi"),
        (TABLE.replace("[18, 100]", "[18]"), r"'range' must be two finite numbers"),
        (TABLE.replace('levels = ["F", "M"]', "levels = []"), r"\[categorical.sex\] needs a non-empty 'levels'"),
        (
            TABLE.replace('levels = ["F", "M"]', 'levels = ["F", "M", "F"]'),
            r"\[categorical.sex\] 'levels' lists F more than once",
        ),
        (TABLE + "\n[categorical.age]\nlevels = [1]\n", r"column 'age' is declared both"),
        (TABLE + "\n[numeric.age]\nrange = [0, 1]\n", r"not valid TOML"),
        (TABLE + "\n[numeric.outcome]\nrange = [0, 1]\n", r"the label column 'outcome' is also declared as a feature"),
        (TABLE + "\n[numeric.patient_id]\nrange = [0, 1]\n", r"the id column 'patient_id' is also declared"),
        (TABLE.replace("[table]", "[tabel]"), r"unknown key 'tabel'.*did you mean 'table'"),
        (TABLE + EVENTS.split("[numeric.hb]")[0], r"exactly one of \[table\] or \[events\]"),
        (TABLE.replace('missing = "impute"', 'missing = "drop"', 1), r"missing = 'drop'.*error, impute, carry-forward"),
        (TABLE.replace('missing = "impute"', 'missing = "carry-forward"', 1), r"carry-forward.*needs an \[events\]"),
        (TABLE.replace('positive = "died"', 'negative = "alive"'), r"'negative' without 'positive'"),
        (TABLE.replace("test-fraction = 0.25", "test-fraction = 1.5"), r"'test-fraction' = 1.5 must be"),
        (TABLE.replace('label = "outcome"', 'label = "patient_id"'), r"one column for two roles"),
        (TABLE.replace('label = "outcome"\n', ""), r"\[table\] needs 'label'"),
        (TABLE + '\n[numeric."sex=F"]\nrange = [0, 1]\n', r"encoded feature name 'sex=F' would occur twice"),
        (EVENTS.replace("max-length = 4", "max-length = 0"), r"'max-length' = 0 must be a whole number"),
        (EVENTS.replace("time-range = [0, 5]\n", ""), r"needs 'time-range'"),
        (EVENTS.replace('time-unit = "days"', 'time-unit = "weeks"'), r"time-unit = 'weeks'"),
        (EVENTS.replace("[numeric.hb]", f"[numeric.{TIME_FEATURE}]"), rf"'{TIME_FEATURE}' would occur twice"),
        ('[table]\nid = "a"\nlabel = "b"\n', r"declares no features"),
    ],
)
def test_a_bad_schema_is_refused_with_a_precise_message(text, match):
    with pytest.raises(FedcareError, match=match):
        EhrSchema.from_text(text, source="fed.toml")


def test_messages_name_the_schema_file(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text(TABLE.replace("[18, 100]", "[100, 18]"))
    with pytest.raises(FedcareError, match=r"federation.toml"):
        EhrSchema.from_file(path)


def test_a_missing_schema_file_says_where_it_looked(tmp_path):
    with pytest.raises(FedcareError, match=r"schema file .*nowhere.toml does not exist"):
        EhrSchema.from_file(tmp_path / "nowhere.toml")


# -- "every other value": positive = "*other*" with negative = [...] (or the reverse) --


def test_positive_other_means_every_value_not_listed_as_negative():
    schema = EhrSchema.from_text(TABLE.replace('positive = "died"', 'positive = "*other*"\nnegative = ["alive", 0]'))
    assert schema.other_label == 1 and schema.negative == ("alive", "0") and schema.positive is None
    reverse = EhrSchema.from_text(TABLE.replace('positive = "died"', 'positive = ["died"]\nnegative = "*other*"'))
    assert reverse.other_label == 0 and reverse.positive == ("died",) and reverse.negative is None
    assert EhrSchema.from_text(TABLE).other_label is None
    assert schema.digest() != reverse.digest() != EhrSchema.from_text(TABLE).digest()


@pytest.mark.parametrize(
    "label_keys,match",
    [
        ('positive = "*other*"', r"positive = \"\*other\*\" needs the values that mean 0.*negative = \["),
        ('negative = "*other*"', r"negative = \"\*other\*\" needs the values that mean 1.*positive = \["),
        ('positive = "*other*"\nnegative = "*other*"', r"'positive' and 'negative' cannot both be \"\*other\*\""),
        ('positive = ["*other*", "died"]\nnegative = ["alive"]', r"'\*other\*' stands alone.*positive = \"\*other\*\""),
        ('positive = ["died"]\nnegative = ["*other*"]', r"'\*other\*' stands alone"),
    ],
)
def test_a_misused_other_marker_is_refused(label_keys, match):
    with pytest.raises(FedcareError, match=match):
        EhrSchema.from_text(TABLE.replace('positive = "died"', label_keys), source="fed.toml")
