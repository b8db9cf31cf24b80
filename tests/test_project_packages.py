"""fedcare.project_packages: the one list of the project's packages, and pyproject.toml agreeing with it."""

from __future__ import annotations

import tomllib

from fedcare.project_packages import PACKAGES
from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_wheel_ships_exactly_the_projects_packages() -> None:
    wheel = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert sorted(wheel) == sorted(PACKAGES) and len(wheel) == len(set(wheel))


def test_the_fab_carries_the_python_files_of_exactly_the_projects_packages() -> None:
    include = PYPROJECT["tool"]["flwr"]["app"]["fab-include"]
    assert sorted(include) == sorted(f"{package}/**/*.py" for package in PACKAGES)


def test_every_package_is_a_folder_of_the_project() -> None:
    assert len(PACKAGES) == len(set(PACKAGES))
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package
