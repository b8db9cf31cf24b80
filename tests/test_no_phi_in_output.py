"""What `fedcare data check` and `fedcare simulate` print about a bad EHR table: never a patient value,
the user's own text (paths, column names, schema sections) verbatim, no traceback, one exit code.

Hospitals' tables are generated (hypothesis, seeded) with a distinctive token in every identifying
or numeric cell and in every header name that is not the schema's; each example breaks the table in
one way (no header row, a misaligned row, a bad cell, a missing column ...) and runs both commands
through the CLI. Both refuse before Flower starts, so an example costs a table load.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.error_output import EXIT_PROBLEM

runner = CliRunner()

# rich markup look-alikes: `[/x]` used to crash rich, the others were silently eaten
BRACKETED = ["[/x]", "[bold]", "[numeric.age]", "bad[kg]", "[red]x[/red]", "[dim]"]
FOLDER_BRACKETS = ["[bold]", "[numeric.age]", "bad[kg]", "[dim]"]  # no "/" in one folder's name
LEVELS = ["lvlA", "lvlB"]
KINDS = [
    "missing-column",
    "no-header",
    "header-one-short",
    "extra-field",
    "bad-numeric",
    "bad-label",
    "missing-value",
    "duplicate-column",
    "empty-file",
    "header-only",
    "unknown-level",
    "unknown-section",
    "section-needs-range",
    "too-few-rows",
]

column_names = st.one_of(st.sampled_from(BRACKETED), st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)).filter(
    lambda n: n not in ("pid", "outcome", "ward") and not n.startswith("lvl")
)


@dataclass
class Hospital:
    """One generated hospital folder and what must (not) appear in any output about it."""

    root: Path  # the --data-root (its path has "[/x]" in it)
    table: Path
    schema: Path
    secrets: set[str] = field(default_factory=set)  # cells and non-schema header names
    verbatim: list[str] = field(default_factory=list)  # user text the message must show as written


def _schema_text(numeric: str, section: str = "numeric", with_range: bool = True) -> str:
    rng = "range = [18, 100]\n" if with_range else ""
    return (
        f'[table]\nid = "pid"\nlabel = "outcome"\npositive = "died"\nnegative = "alive"\n\n'
        f'[{section}."{numeric}"]\nunit = "years"\n{rng}\n'
        f"[categorical.ward]\nlevels = {LEVELS!r}\n".replace("'", '"')
    )


def make_hospital(base: Path, kind: str, numeric: str, folder: str, seed: int, n: int) -> Hospital:
    rng = np.random.default_rng(seed)
    root = base / "a[" / f"x]{folder}"  # data-root path holds "a[/x]" and a bracketed name
    where = root / "hospital-0"
    where.mkdir(parents=True)
    ids = [f"MRN-SECRET-{seed % 997:03d}{i:04d}" for i in range(n)]
    values = [f"{v:.4f}" for v in rng.uniform(20, 90, n)]
    wards = [LEVELS[i % 2] for i in range(n)]
    labels = ["died" if i % 3 == 0 else "alive" for i in range(n)]
    header = ["pid", numeric, "ward", "outcome", f"SECRETCOL{seed}"]
    extra = [f"SECRETNOTE{seed}x{i}" for i in range(n)]
    rows = [list(r) for r in zip(ids, values, wards, labels, extra)]
    secrets = set(ids) | set(values) | set(extra) | {header[-1]}
    schema = _schema_text(numeric)
    verbatim = [str(root)]
    bad = f"SECRETNAME{seed}"
    if kind == "missing-column":
        header[1] = f"SECRETHEAD{seed}"
        secrets.add(header[1])
        verbatim.append(numeric)
    elif kind == "no-header":
        header = None
    elif kind == "header-one-short":  # the header lacks one name: pandas would shift every column
        header = header[1:]
    elif kind == "extra-field":
        rows[2].append(bad)
        secrets.add(bad)
    elif kind == "bad-numeric":
        rows[1][1] = bad
        secrets.add(bad)
        verbatim.append(numeric)
    elif kind == "bad-label":
        rows[3][3] = bad
        secrets.add(bad)
    elif kind == "missing-value":
        rows[0][1] = ""
        verbatim.append(f"[numeric.{numeric}]")  # the hint names the schema section to change
    elif kind == "duplicate-column":
        header.append(numeric)
        header.append(header[4])
        for r in rows:
            r += [r[1], r[4]]
        verbatim.append(numeric)
    elif kind == "unknown-level":
        rows[4][2] = bad
        secrets.add(bad)
    elif kind == "unknown-section":
        schema = _schema_text(numeric, section="numerc")
    elif kind == "section-needs-range":
        schema = _schema_text(numeric, with_range=False)
        verbatim.append(f"[numeric.{numeric}]")
    lines = ([",".join(header)] if header is not None else []) + [",".join(r) for r in rows]
    text = "\n".join(lines) + "\n"
    if kind == "empty-file":
        text = ""
    elif kind == "header-only":
        text = lines[0] + "\n"
    if kind == "too-few-rows":  # a clean table, smaller than one batch of the default size
        verbatim = ["fewer than one batch (30)"]
    table = where / "table.csv"
    table.write_text(text)
    (where / "schema.toml").write_text(schema)
    return Hospital(root, table, where / "schema.toml", secrets, verbatim)


def assert_safe(result, hospital: Hospital) -> str:
    output = result.output
    assert result.exit_code == EXIT_PROBLEM, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output and "MarkupError" not in output
    leaked = sorted(s for s in hospital.secrets if s in output)
    assert not leaked, f"patient values in the output: {leaked}\n{output}"
    for text in hospital.verbatim:
        assert text in output, f"{text!r} is not shown verbatim:\n{output}"
    return output


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    numeric=column_names, folder=st.sampled_from(FOLDER_BRACKETS), seed=st.integers(0, 10_000), n=st.integers(12, 20)
)
def test_data_errors_show_no_cell_and_user_text_verbatim(kind, numeric, folder, seed, n):
    with tempfile.TemporaryDirectory() as tmp:
        hospital = make_hospital(Path(tmp), kind, numeric, folder, seed, n)
        checked = runner.invoke(app, ["data", "check", str(hospital.table), "--schema", str(hospital.schema)])
        message = assert_safe(checked, hospital)
        simulated = runner.invoke(
            app,
            [
                "simulate",
                "--dataset",
                "ehr-table",
                "--data-root",
                str(hospital.root),
                "--rounds",
                "1",
                "--no-local-baseline",
                "--output-dir",
                f"{tmp}/run",
            ],
        )
        assert_safe(simulated, hospital)
        if kind == "too-few-rows":
            return
        # the same loader refuses it, with the same reason
        reason = re.sub(r"\s+", " ", message.split("error:", 1)[-1]).strip()
        assert reason in re.sub(r"\s+", " ", simulated.output), (message, simulated.output)


def test_a_file_without_a_header_row_is_named_as_such_and_counts_columns(tmp_path):
    hospital = make_hospital(tmp_path, "no-header", "age", "[bold]", seed=3, n=12)
    done = runner.invoke(app, ["data", "check", str(hospital.table), "--schema", str(hospital.schema)])
    text = " ".join(assert_safe(done, hospital).split())
    assert "none of the schema's columns" in text and "5 columns" in text and "header row" in text


EVENTS_SCHEMA = """
[events]
id = "pid"
time = "day"
time-unit = "days"
time-range = [0, 2]
max-length = 3
label = "y"

[numeric."crp[mg/L]"]
range = [0, 500]
"""


def test_an_events_file_without_its_header_row_shows_no_cell(tmp_path):
    folder = tmp_path / "a[" / "x]"
    folder.mkdir(parents=True)
    rows = [f"MRN-SECRET-{i:04d},{i * 3},{i}.7531,{i % 2}" for i in range(12)]
    (folder / "events.csv").write_text("\n".join(rows) + "\n")
    (folder / "schema.toml").write_text(EVENTS_SCHEMA)
    done = runner.invoke(app, ["data", "check", str(folder / "events.csv"), "--schema", str(folder / "schema.toml")])
    text = " ".join(done.output.split())
    assert done.exit_code == EXIT_PROBLEM and "Traceback" not in text, done.output
    assert "MRN-SECRET" not in text and ".7531" not in text
    assert "a[/x]" in text and "'crp[mg/L]'" in text and "names none of the schema's columns (4 columns" in text


def test_node_start_check_only_shows_no_cell_of_a_headerless_table(tmp_path):
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    deployed = runner.invoke(app, ["deploy", "init", str(tmp_path / "d"), "--hospital", "a", "--hospital", "b"])
    assert deployed.exit_code == 0, deployed.output
    hospital = make_hospital(tmp_path / "data", "no-header", "[numeric.age]", "bad[kg]", seed=1, n=12)
    settings = tmp_path / "d" / "a" / "hospital.toml"
    text = re.sub(r"clientappio-port = \d+", f"clientappio-port = {port}", settings.read_text())
    text = re.sub(
        r'dataset = "fed-heart-disease".*\npartition-id = \d+\n',
        f'dataset = "ehr-table"\ndata-path = "{hospital.table}"\nschema = "{hospital.schema}"\n',
        text,
    )
    settings.write_text(text)
    done = runner.invoke(app, ["node", "start", "--config", str(settings), "--check-only"])
    text = " ".join(assert_safe(done, hospital).split())
    assert "the node's data would not load" in text and "names none of the schema's columns" in text
