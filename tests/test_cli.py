"""`fedcare simulate` refuses bad input with one line saying what to do (no traceback)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _fedcare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcare.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--strategy", "scaffold"], "unknown strategy 'scaffold'"),
    (["--epsilon", "0"], "target epsilon must be > 0"),
    (["--epsilon", "-2"], "target epsilon must be > 0"),
    (["--batch-size", "64"], "Switzerland' has 30 training samples, fewer than one batch (64)"),
])
def test_bad_input_gets_a_one_line_error(args, message):
    done = _fedcare("simulate", "--rounds", "1", *args)
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr + done.stdout


def test_help_lists_the_options_a_researcher_needs():
    done = _fedcare("simulate", "--help")
    assert done.returncode == 0
    for option in ("--dataset", "--rounds", "--local-epochs", "--strategy", "--model", "--epsilon", "--delta",
                   "--no-dp", "--seed", "--output-dir"):
        assert option in done.stdout
