"""Test-wide settings: loopback-only Ray, no telemetry, a private FLWR_HOME, quiet warnings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcare.safe_environment import apply_safe_environment  # noqa: E402

apply_safe_environment()


@pytest.fixture(autouse=True)
def _private_flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.getbasetemp() / "flwr-home"))
