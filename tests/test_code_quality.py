"""Lint, format and types stay clean: `ruff check .`, `ruff format --check .` and `mypy`, from the repo root.

The settings live in pyproject.toml ([tool.ruff], [tool.mypy]); the tools are the test extra's pinned
versions, run with this interpreter (``python -m ruff`` / ``python -m mypy``). Each test fails with the
tool's own report, so the fix is named in the failure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _report(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_ruff_lint_is_clean():
    result = _run("ruff", "check", "--no-cache", ".", timeout=300)
    assert result.returncode == 0, "ruff check . found problems (`ruff check --fix .` fixes some):\n" + _report(result)


def test_ruff_format_is_clean():
    result = _run("ruff", "format", "--check", "--no-cache", ".", timeout=300)
    assert result.returncode == 0, "ruff format --check . would reformat (run `ruff format .`):\n" + _report(result)


def test_mypy_is_clean():
    # the packages to check are [tool.mypy] packages in pyproject.toml (the product packages)
    result = _run("mypy", timeout=900)
    assert result.returncode == 0, "mypy found type errors in the product packages:\n" + _report(result)
