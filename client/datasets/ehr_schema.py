"""The EHR schema: the public data dictionary every hospital of a federation shares.

A schema says which columns a hospital's table (or events table) holds, how each is encoded and
which public plausible range each numeric value has. The data stays at the hospital; the schema
travels, so it must hold no patient data. Format (TOML)::

    [table]                       # a patient-level table: one row per patient
    id = "patient_id"
    label = "outcome"             # 0/1, or the values listed in `positive` (and `negative`)
    positive = "died"             # optional: label value(s) meaning 1 (a string or a list)
    negative = ["alive"]          # optional: value(s) meaning 0; without it, every other value is 0
                                  # either one may be "*other*": every value the other one does not
                                  # list (positive = "*other*" + negative = ["none"]: all but "none" are 1)
    test-fraction = 0.3           # optional (default 0.3)

    [numeric.age]
    unit = "years"
    range = [18, 100]             # public plausible range (lo < hi): clips the statistics round
    missing = "error"             # "error" (default) | "impute" | "carry-forward" (events only)
    description = "..."           # optional

    [categorical.sex]
    levels = ["F", "M"]           # strings, integers or booleans; one-hot encoded as "sex=F", "sex=M"
    missing = "error"

An event-sequence schema has ``[events]`` instead of ``[table]`` (exactly one of the two)::

    [events]
    id = "patient_id"
    time = "day"
    time-unit = "days"            # "days" | "hours" | "years" | "datetime" (ISO 8601 text)
    time-range = [0, 2]           # public range of the time feature (years since the first event)
    max-length = 8                # most recent events kept per patient
    label = "outcome"
    label-source = "events"       # "events" (constant per patient) | "labels-table" (separate file:
                                  # labels.csv|parquet beside events.csv in a hospital folder, the
                                  # node config's `labels`, or `fedcare data check --labels`)
    positive = "died"             # as in [table]
    test-fraction = 0.3

Every declared [numeric.*] and [categorical.*] column is then a per-step feature.

Encoded features, in order: the numeric columns (raw units), the one-hot ``col=level`` columns,
one ``col:missing`` indicator per column whose ``missing`` is not "error", and (events only) the
time feature ``years-since-first-event``. Each has public bounds (one-hot and indicators [0, 1]).
Missing values of "impute"/"carry-forward" columns stay NaN in the encoded arrays; see
``client/datasets/ehr_table.py`` for what normalisation does with them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from fedcare.errors import FedcareError

MISSING_POLICIES = ("error", "impute", "carry-forward")
TIME_UNITS = {"days": 1 / 365.25, "hours": 1 / (24 * 365.25), "years": 1.0, "datetime": None}
LABEL_SOURCES = ("events", "labels-table")
OTHER_VALUES = "*other*"  # positive/negative = "*other*": every label value the other key does not list
TIME_FEATURE = "years-since-first-event"
DEFAULT_TEST_FRACTION = 0.3

_INTEGRAL_TEXT = re.compile(r"^([+-]?\d+)\.0+$")
_TOP_KEYS = ("table", "events", "numeric", "categorical")
_TABLE_KEYS = ("id", "label", "positive", "negative", "test-fraction")
_EVENTS_KEYS = (*_TABLE_KEYS, "time", "time-unit", "time-range", "max-length", "label-source")
_NUMERIC_KEYS = ("unit", "range", "missing", "description")
_CATEGORICAL_KEYS = ("levels", "missing", "description")


def indicator_name(column: str) -> str:
    """The encoded 0/1 feature saying that ``column``'s value is missing (NaN) in that row/step."""
    return f"{column}:missing"


def onehot_name(column: str, level: str) -> str:
    return f"{column}={level}"


def level_text(value: Any) -> str:
    """Canonical text of a category level or label value, so TOML and file values compare equal.

    Integral numbers lose their ".0" -- also as text, since pandas writes an integer column with
    blanks as "4.0" -- booleans are "true"/"false" as in TOML, text is stripped of spaces.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    match = _INTEGRAL_TEXT.match(text)
    return str(int(match.group(1))) if match else text


@dataclass(frozen=True)
class NumericSpec:
    name: str
    lo: float
    hi: float
    unit: str = ""
    missing: str = "error"
    description: str = ""


@dataclass(frozen=True)
class CategoricalSpec:
    name: str
    levels: tuple[str, ...]
    missing: str = "error"
    description: str = ""


@dataclass(frozen=True)
class EventSpec:
    time: str
    time_unit: str
    time_range: tuple[float, float]
    max_length: int
    label_source: str = "events"


@dataclass(frozen=True)
class EhrSchema:
    """A validated schema. Build it with ``from_file`` (or ``from_text`` / ``from_dict``)."""

    source: str  # where it was read from, for messages
    id: str
    label: str
    positive: tuple[str, ...] | None
    negative: tuple[str, ...] | None
    test_fraction: float
    numeric: dict[str, NumericSpec]
    categorical: dict[str, CategoricalSpec]
    events: EventSpec | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    other_label: int | None = None  # 1: positive = "*other*" (unlisted values are 1); 0: negative = "*other*"

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> EhrSchema:
        path = Path(path)
        if not path.is_file():
            raise FedcareError(
                f"schema file {path} does not exist",
                "pass the federation's schema TOML (the coordinator distributes it)",
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise FedcareError(f"schema file {path} is not UTF-8 text", "save it as UTF-8") from None
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<schema>") -> EhrSchema:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FedcareError(
                f"{source}: not valid TOML ({exc})", "fix the line named; a name declared twice is also reported here"
            ) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<schema>") -> EhrSchema:
        return _parse(data, source)

    # -- what the loaders and the federation need ---------------------------------------------

    @property
    def kind(self) -> str:
        """ "table" (one row per patient) or "events" (event sequences)."""
        return "events" if self.events is not None else "table"

    @property
    def section(self) -> str:
        return f"[{self.kind}]"

    @property
    def imputed_columns(self) -> list[str]:
        """Declared columns whose missing values are imputed (each gets a ``col:missing`` feature)."""
        specs = list(self.numeric.values()) + list(self.categorical.values())
        return [s.name for s in specs if s.missing != "error"]

    @property
    def feature_names(self) -> list[str]:
        """Encoded features in array order: numeric, one-hot, missing indicators, time (events)."""
        names = list(self.numeric)
        for spec in self.categorical.values():
            names += [onehot_name(spec.name, level) for level in spec.levels]
        names += [indicator_name(c) for c in self.imputed_columns]
        if self.events is not None:
            names.append(TIME_FEATURE)
        return names

    @property
    def numeric_bounds(self) -> dict[str, tuple[float, float]]:
        """Public ranges of the declared numeric columns (raw units)."""
        return {s.name: (s.lo, s.hi) for s in self.numeric.values()}

    @property
    def feature_bounds(self) -> dict[str, tuple[float, float]]:
        """Public bounds of every encoded feature: what the statistics round clips to."""
        bounds = dict(self.numeric_bounds)
        for name in self.feature_names:
            bounds.setdefault(name, (0.0, 1.0))
        if self.events is not None:
            bounds[TIME_FEATURE] = self.events.time_range
        return {name: bounds[name] for name in self.feature_names}

    @property
    def input_columns(self) -> list[str]:
        """The file columns a loader reads (id, time, label where it lives there, features)."""
        cols = [self.id]
        if self.events is not None:
            cols.append(self.events.time)
        if self.events is None or self.events.label_source == "events":
            cols.append(self.label)
        return cols + list(self.numeric) + list(self.categorical)

    def digest(self) -> str:
        """SHA-256 of the schema's meaning (not its formatting): hospitals compare it to agree."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()


# -- parsing ----------------------------------------------------------------------------------


def _fail(source: str, where: str, problem: str, hint: str = "") -> FedcareError:
    return FedcareError(f"{source}: {where} {problem}", hint)


def _check_keys(source: str, where: str, table: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise _fail(source, where, "must be a TOML table (a [section])")
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise _fail(source, where, f"has an unknown key '{key}'", f"{hint}allowed keys: {', '.join(allowed)}")
    return table


def _name(source: str, where: str, table: dict, key: str, required: bool = True) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise _fail(source, where, f"needs '{key}'", f'add {key} = "<column name>" under {where}')
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, where, f"'{key}' must be a non-empty column name (text)")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range(source: str, where: str, key: str, value: Any) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)):
        raise _fail(source, where, f"'{key}' must be two finite numbers [lo, hi]", f"e.g. {key} = [0, 10]")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise _fail(
            source,
            where,
            f"'{key}' = [{value[0]}, {value[1]}] needs lo < hi",
            "declare the public plausible range, lowest value first",
        )
    return lo, hi


def _values(source: str, where: str, key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, (str, int, float, bool)) for v in items):
        raise _fail(source, where, f"'{key}' must be a label value or a non-empty list of them")
    texts = tuple(level_text(v) for v in items)
    if len(set(texts)) != len(texts) or "" in texts:
        raise _fail(source, where, f"'{key}' lists an empty or repeated value")
    return texts


def _label_values(
    source: str, where: str, head: dict
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, int | None]:
    """(positive, negative, other_label): the listed label values, and which label every unlisted
    value takes when one key is "*other*" (it is then None, and the other key must list values)."""
    raw = {key: head.get(key) for key in ("positive", "negative")}
    for key, value in raw.items():
        if isinstance(value, list) and OTHER_VALUES in value:
            raise _fail(
                source,
                where,
                f"'{key}' lists '{OTHER_VALUES}' among values: '{OTHER_VALUES}' stands alone",
                f'write {key} = "{OTHER_VALUES}" and list the values of the other label',
            )
    others = [key for key, value in raw.items() if value == OTHER_VALUES]
    if len(others) == 2:
        raise _fail(
            source,
            where,
            f"'positive' and 'negative' cannot both be \"{OTHER_VALUES}\"",
            f'list the values of one label, e.g. negative = ["none"] with positive = "{OTHER_VALUES}"',
        )
    if others:
        rest, listed = others[0], "negative" if others[0] == "positive" else "positive"
        if raw[listed] is None:
            meaning = "0" if listed == "negative" else "1"
            raise _fail(
                source,
                where,
                f'{rest} = "{OTHER_VALUES}" needs the values that mean {meaning}',
                f'add {listed} = ["<value>", ...] under {where}',
            )
        values = _values(source, where, listed, raw[listed])
        return (None, values, 1) if rest == "positive" else (values, None, 0)
    return (
        _values(source, where, "positive", raw["positive"]),
        _values(source, where, "negative", raw["negative"]),
        None,
    )


def _missing(source: str, where: str, spec: dict, events: bool) -> str:
    policy = spec.get("missing", "error")
    if policy not in MISSING_POLICIES:
        raise _fail(source, where, f"has missing = {policy!r}", f"use one of: {', '.join(MISSING_POLICIES)}")
    if policy == "carry-forward" and not events:
        raise _fail(
            source,
            where,
            'has missing = "carry-forward", which needs an [events] schema',
            'use "impute" for a patient-level table',
        )
    return policy


def _text(source: str, where: str, spec: dict, key: str) -> str:
    value = spec.get(key, "")
    if not isinstance(value, str):
        raise _fail(source, where, f"'{key}' must be text")
    return value


def _section(source: str, data: dict[str, Any], key: str) -> dict[str, Any]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise _fail(source, f"'{key}'", "must hold [" + key + ".<column>] sections")
    return table


def _parse_head(source: str, data: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
    """(events_mode, "[table]"/"[events]", that section), after checking the top-level keys."""
    _check_keys(source, "the schema", data, _TOP_KEYS)
    if ("table" in data) == ("events" in data):
        raise FedcareError(
            f"{source}: a schema needs exactly one of [table] or [events]",
            "[table] for one row per patient, [events] for event sequences",
        )
    events_mode = "events" in data
    where = "[events]" if events_mode else "[table]"
    head = _check_keys(
        source, where, data["events" if events_mode else "table"], _EVENTS_KEYS if events_mode else _TABLE_KEYS
    )
    return events_mode, where, head


def _parse_labels(
    source: str, where: str, head: dict
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, int | None]:
    """(positive, negative, other_label), checked for consistency between the two keys."""
    positive, negative, other_label = _label_values(source, where, head)
    if negative is not None and positive is None and other_label is None:
        raise _fail(source, where, "declares 'negative' without 'positive'", 'declare positive = "<value>" too')
    if positive and negative and set(positive) & set(negative):
        raise _fail(source, where, "lists a value in both 'positive' and 'negative'")
    return positive, negative, other_label


def _test_fraction(source: str, where: str, head: dict) -> Any:
    fraction = head.get("test-fraction", DEFAULT_TEST_FRACTION)
    if not _number(fraction) or not 0.0 <= fraction < 1.0:
        raise _fail(source, where, f"'test-fraction' = {fraction!r} must be a number in [0, 1)", "e.g. 0.3")
    return fraction


def _parse_events(source: str, where: str, head: dict) -> EventSpec:
    """The [events] section's sequence keys (time column, unit, range, max-length, label source)."""
    time = cast(str, _name(source, where, head, "time"))  # required: never None
    unit = head.get("time-unit", "days")
    if unit not in TIME_UNITS:
        raise _fail(source, where, f"has time-unit = {unit!r}", f"use one of: {', '.join(TIME_UNITS)}")
    if "time-range" not in head:
        raise _fail(
            source,
            where,
            "needs 'time-range'",
            "the public range of years since a patient's first event, e.g. time-range = [0, 5]",
        )
    max_length = head.get("max-length")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise _fail(
            source,
            where,
            f"'max-length' = {max_length!r} must be a whole number >= 1",
            "the number of most recent events kept per patient, e.g. max-length = 16",
        )
    label_source = head.get("label-source", "events")
    if label_source not in LABEL_SOURCES:
        raise _fail(source, where, f"has label-source = {label_source!r}", f"use one of: {', '.join(LABEL_SOURCES)}")
    return EventSpec(time, unit, _range(source, where, "time-range", head["time-range"]), max_length, label_source)


def _parse_numeric(source: str, data: dict[str, Any], events_mode: bool) -> dict[str, NumericSpec]:
    """The [numeric.<column>] sections, in file order."""
    numeric: dict[str, NumericSpec] = {}
    for name, spec in _section(source, data, "numeric").items():
        w = f"[numeric.{name}]"
        _check_keys(source, w, spec, _NUMERIC_KEYS)
        if "range" not in spec:
            raise _fail(source, w, "needs 'range'", "declare the public plausible range, e.g. range = [0, 10]")
        lo, hi = _range(source, w, "range", spec["range"])
        numeric[name] = NumericSpec(
            name,
            lo,
            hi,
            _text(source, w, spec, "unit"),
            _missing(source, w, spec, events_mode),
            _text(source, w, spec, "description"),
        )
    return numeric


def _levels(source: str, where: str, spec: dict) -> tuple[str, ...]:
    """A categorical column's 'levels' as canonical texts: non-empty, each listed once."""
    levels = spec.get("levels")
    if not isinstance(levels, list) or not levels:
        raise _fail(source, where, "needs a non-empty 'levels' list", 'e.g. levels = ["F", "M"]')
    if not all(isinstance(v, (str, int, bool)) for v in levels):
        raise _fail(source, where, "'levels' must be text, whole numbers or booleans")
    texts = tuple(level_text(v) for v in levels)
    if "" in texts:
        raise _fail(source, where, "'levels' holds an empty level")
    if len(set(texts)) != len(texts):
        dup = sorted({t for t in texts if texts.count(t) > 1})
        raise _fail(source, where, f"'levels' lists {', '.join(dup)} more than once")
    return texts


def _parse_categorical(source: str, data: dict[str, Any], events_mode: bool) -> dict[str, CategoricalSpec]:
    """The [categorical.<column>] sections, in file order."""
    categorical: dict[str, CategoricalSpec] = {}
    for name, spec in _section(source, data, "categorical").items():
        w = f"[categorical.{name}]"
        _check_keys(source, w, spec, _CATEGORICAL_KEYS)
        texts = _levels(source, w, spec)
        categorical[name] = CategoricalSpec(
            name, texts, _missing(source, w, spec, events_mode), _text(source, w, spec, "description")
        )
    return categorical


def _check_features(source: str, numeric: dict[str, NumericSpec], categorical: dict[str, CategoricalSpec]) -> None:
    """At least one feature is declared, and no column is both numeric and categorical."""
    if not numeric and not categorical:
        raise FedcareError(
            f"{source}: the schema declares no features", "add [numeric.<column>] or [categorical.<column>] sections"
        )
    both = sorted(set(numeric) & set(categorical))
    if both:
        raise FedcareError(
            f"{source}: column '{both[0]}' is declared both [numeric.{both[0]}] and [categorical.{both[0]}]",
            "declare each column once",
        )


def _check_roles(
    source: str,
    where: str,
    roles: dict[str, str | None],
    numeric: dict[str, NumericSpec],
    categorical: dict[str, CategoricalSpec],
) -> None:
    """The id, label and time columns are distinct and none of them is also a feature."""
    for role, col in roles.items():
        if col in numeric or col in categorical:
            raise FedcareError(
                f"{source}: the {role} column '{col}' is also declared as a feature",
                f"remove [numeric.{col}] / [categorical.{col}]: the {role} is not an input",
            )
    used = list(roles.values())
    if len(set(used)) != len(used):
        listed = ", ".join(f"{role}={col}" for role, col in roles.items())
        raise FedcareError(
            f"{source}: {where} uses one column for two roles ({listed})",
            "id, label and time must be different columns",
        )


def _check_encoded_names(source: str, schema: EhrSchema) -> None:
    """No two encoded features (numeric, one-hot, indicator, time) share a name."""
    names = schema.feature_names
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise FedcareError(
            f"{source}: encoded feature name '{clash[0]}' would occur twice",
            "rename the column or level so one-hot (col=level) and indicator (col:missing) "
            f"names stay distinct; '{TIME_FEATURE}' is reserved in [events] schemas",
        )


def _parse(data: dict[str, Any], source: str) -> EhrSchema:
    events_mode, where, head = _parse_head(source, data)
    id_col = cast(str, _name(source, where, head, "id"))  # required: never None
    label = cast(str, _name(source, where, head, "label"))
    positive, negative, other_label = _parse_labels(source, where, head)
    fraction = _test_fraction(source, where, head)
    event_spec = _parse_events(source, where, head) if events_mode else None
    numeric = _parse_numeric(source, data, events_mode)
    categorical = _parse_categorical(source, data, events_mode)
    _check_features(source, numeric, categorical)
    roles: dict[str, str | None] = {"id": id_col, "label": label}
    if event_spec is not None:
        roles["time"] = event_spec.time
    _check_roles(source, where, roles, numeric, categorical)

    schema = EhrSchema(
        source=source,
        id=id_col,
        label=label,
        positive=positive,
        negative=negative,
        other_label=other_label,
        test_fraction=float(fraction),
        numeric=numeric,
        categorical=categorical,
        events=event_spec,
        raw=data,
    )
    _check_encoded_names(source, schema)
    return schema
