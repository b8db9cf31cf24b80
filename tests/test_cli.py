"""`fedcare simulate` refuses bad input with one line saying what to do (no traceback)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _fedcare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedcare.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--strategy", "scaffold"], "unknown strategy 'scaffold'"),
        (["--epsilon", "0"], "target epsilon must be > 0"),
        (["--epsilon", "-2"], "target epsilon must be > 0"),
    ],
)
def test_bad_input_gets_a_one_line_error(args, message):
    done = _fedcare("simulate", "--rounds", "1", *args)
    assert done.returncode == 2  # a usage error: the command line is wrong
    assert message in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr + done.stdout


def test_data_a_run_cannot_train_on_exits_1_like_data_check():
    done = _simulate_in_process("--batch-size", "64")
    assert done.exit_code == 1, done.output  # the data has a problem (README "Exit codes")
    message = " ".join(done.output.split())
    assert "Switzerland' has 30 training samples, fewer than one batch (64)" in message
    assert "too few rows for DP training" in message and "lower batch-size" not in message


def test_one_exit_code_convention_across_subcommands(tmp_path):
    """0 ok, 1 the data/run has a problem, 2 a usage error: click's own and the commands' alike."""
    from typer.testing import CliRunner

    from fedcare.cli import app
    from fedcare.error_output import EXIT_PROBLEM, EXIT_USAGE

    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    (tmp_path / "s.toml").write_text('[table]\nid = "a"\nlabel = "b"\n[numeric.c]\nrange = [0, 1]\n')
    cases = [
        (["simulate", "--no-such-option"], EXIT_USAGE),  # click
        (["simulate", "--dataset", "ehr-table"], EXIT_USAGE),  # no --data-root
        (["simulate", "--dataset", "ehr-table", "--data-root", str(tmp_path)], EXIT_USAGE),  # no hospital-<i>
        (["data", "check", str(tmp_path / "absent")], EXIT_USAGE),
        (["data", "check", str(tmp_path / "t.csv"), "--schema", str(tmp_path / "s.toml")], EXIT_PROBLEM),
        (
            ["data", "check", str(tmp_path / "t.csv"), "--schema", str(tmp_path / "s.toml"), "--batch-size", "0"],
            EXIT_USAGE,
        ),
        (["audit", "verify", str(tmp_path / "absent.jsonl")], EXIT_USAGE),
        (["node", "start", "--config", str(tmp_path / "absent.toml")], EXIT_USAGE),
    ]
    for args, code in cases:
        done = CliRunner().invoke(app, args)
        assert done.exit_code == code, (args, done.output)
        assert "Traceback" not in done.output and isinstance(done.exception, SystemExit), (args, done.output)


def test_readme_documents_the_exit_codes():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Exit codes") :][:1200]
    for line in ("`0`", "`1`", "`2`"):
        assert line in section


def test_help_lists_the_options_a_researcher_needs():
    done = _fedcare("simulate", "--help")
    assert done.returncode == 0
    for option in (
        "--dataset",
        "--rounds",
        "--local-epochs",
        "--strategy",
        "--model",
        "--epsilon",
        "--delta",
        "--no-dp",
        "--seed",
        "--output-dir",
    ):
        assert option in done.stdout


def _simulate_in_process(*args: str):
    from typer.testing import CliRunner

    from fedcare.cli import app

    return CliRunner().invoke(app, ["simulate", "--rounds", "1", *args])


def test_every_run_setting_has_a_simulate_option():
    """A hint may tell the user to change any run setting: `fedcare simulate` must offer each one."""
    import click
    import typer

    from fedcare.cli import app
    from fedcare.run_config import RunSettings, simulate_option

    command = typer.main.get_command(app).commands["simulate"]
    offered = {flag for p in command.params if isinstance(p, click.Option) for flag in p.opts + p.secondary_opts}
    for name in RunSettings.__dataclass_fields__:
        for flag in simulate_option(name).split("/"):
            assert flag in offered, f"run setting {name}: no simulate option {flag}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--secagg-clip-range", "-1"], "secagg-clip-range must be > 0, got -1.0"),
        (["--secagg-threshold", "-2"], "secagg-threshold must be >= 0"),
        (["--max-grad-norm", "0"], "max-grad-norm must be > 0, got 0.0"),
        (["--stats-budget-fraction", "1.5"], "stats-budget-fraction must be in (0, 1), got 1.5"),
        (["--proximal-mu", "-0.5"], "proximal-mu must be >= 0, got -0.5"),
        (["--server-learning-rate", "0"], "server-learning-rate must be > 0, got 0.0"),
    ],
)
def test_each_new_simulate_option_reaches_its_run_setting(args, message):
    """A bad value is refused by the RunSettings check naming that field: the option sets that field."""
    done = _simulate_in_process(*args)
    assert done.exit_code == 2, done.output
    assert message in " ".join(done.output.split())
    assert "Traceback" not in done.output


def test_a_simulation_that_did_not_do_its_planned_rounds_prints_its_table_then_exits_1(tmp_path, monkeypatch):
    """An incomplete run keeps its table and results, and ends with exit 1 and the reason (README "Exit codes")."""
    from types import SimpleNamespace

    reason = "1 of 2 planned rounds done; round 2 trained by 0 of 4 hospital(s); the final model is round 1's"
    saved = {}
    monkeypatch.setattr(
        "simulation.runner.run",
        lambda s, **kw: SimpleNamespace(results={"status": "incomplete", "stopped_early": reason, "rounds": []}),
    )
    monkeypatch.setattr("simulation.baseline_comparison.compare_with_local", lambda *a, **k: ([], None))
    monkeypatch.setattr("fedcare.results_table.build_table", lambda *a, **k: "THE FINAL TABLE")
    monkeypatch.setattr("server.run_report.save_results", lambda out, results: saved.update(results))
    done = _simulate_in_process("--output-dir", str(tmp_path / "out"), "--no-local-baseline")
    message = " ".join(done.output.split())
    assert done.exit_code == 1, done.output
    assert "THE FINAL TABLE" in message and f"the run is incomplete: {reason}" in message
    assert saved["status"] == "incomplete"
